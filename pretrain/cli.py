"""Command-line conventions shared by every entry point: one-line errors, fixed exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

USAGE_ERROR = 2
RUNTIME_ERROR = 1


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def fail(prog: str, message: str) -> NoReturn:
    """Report a runtime error as one line on stderr and exit with code 1."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(RUNTIME_ERROR)
