#!/usr/bin/env python
"""Launch a SparK sweep: ``python slurm/launch_all.py --stage pretrain,cls,det [--sweep tiny|table3|...|paper]``.

Run ``python slurm/launch_all.py --help`` for the flags; the work happens in :mod:`slurm.launcher`.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    # Run as a script: import this folder as the package ``slurm`` (what submitit's jobs unpickle), not its
    # modules as top-level ones.
    sys.path[0] = os.path.dirname(HERE)

from slurm.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
