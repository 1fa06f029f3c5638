"""``python -m slurm.require FILE...``: a sweep step that is done when files another run should have written (or the
user gave with ``--path``) exist, and otherwise fails naming the missing ones.

A sweep uses it for inputs that either a run of the sweep makes or the user supplies: the step ``creates`` the
files, so the launcher counts it finished as soon as they exist (a user's file: nothing waits for the run that
would have made it); when they do not exist after that run, this command says so in one line (exit 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pretrain.runtime.cli import ArgumentParser, run_cli
from pretrain.runtime.errors import SuiteError

PROG = "python -m slurm.require"


def check(paths: Sequence[str]) -> list[str]:
    """The paths of ``paths`` that are not existing files."""
    return [path for path in paths if not os.path.isfile(path)]


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every file exists, 1 naming the missing ones, 2 on a usage error."""
    parser = ArgumentParser(prog=PROG, description="Check that the files a sweep step needs exist.")
    parser.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)

    def body() -> int:
        missing = check(args.files)
        if missing:
            raise SuiteError(f"missing {', '.join(missing)} (the run that writes it has not, or the path given with "
                             "--path is wrong)")
        print(f"found {', '.join(args.files)}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
