"""Command-line conventions shared by every entry point: one-line errors, fixed exit codes, one logging set-up."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from .errors import SuiteError, UsageError

__all__ = ["RUNTIME_ERROR", "USAGE_ERROR", "ArgumentParser", "fail", "one_line", "report", "run_cli", "setup_logging"]

USAGE_ERROR = 2
RUNTIME_ERROR = 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def report(prog: str, message: object) -> None:
    """Print ``prog: error: message`` as one line on stderr."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)


def fail(prog: str, message: object, code: int = RUNTIME_ERROR) -> NoReturn:
    """Report an error as one line on stderr and exit with ``code`` (1: runtime error)."""
    report(prog, message)
    sys.exit(code)


def run_cli(prog: str, body: Callable[[], int | None], runtime_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a tool's ``body`` and turn the errors a user can fix into one line on stderr.

    :class:`UsageError` exits with code 2 at once (``SystemExit``, as argparse does for bad flags);
    :class:`SuiteError`, ``OSError`` and ``runtime_errors`` return 1. Anything else is a bug and keeps its
    traceback. Returns ``body``'s exit code (``None`` means 0).
    """
    try:
        return body() or 0
    except UsageError as error:
        fail(prog, error, USAGE_ERROR)
    except (SuiteError, OSError, *runtime_errors) as error:
        report(prog, error)
        return RUNTIME_ERROR


def setup_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    """Log ``level`` and above on the main rank, warnings and errors on the others, to stderr (once per process)."""
    logging.basicConfig(level=level if is_main else logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S",
                        stream=sys.stderr)
