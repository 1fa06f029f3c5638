"""``python -m slurm``: the sweep launcher, the same as ``python slurm/launch_all.py`` (see :mod:`slurm.launcher`)."""

import sys

from slurm.launcher import main

if __name__ == "__main__":
    sys.exit(main())
