"""The errors every stage reports to its user as one line (no traceback): the CLIs catch these."""

from __future__ import annotations

__all__ = ["RunError", "SuiteError", "UsageError"]


class SuiteError(Exception):
    """A problem the user can fix (bad data, unreadable checkpoint, failed run), reported as one line, exit 1.

    Stage-specific errors subclass it (``DataError``, ``CheckpointError``, ``RunError``...).
    """


class UsageError(SuiteError, ValueError):
    """A command line or configuration that cannot run (unknown key, bad value): one line, exit 2."""


class RunError(SuiteError, RuntimeError):
    """A run that cannot continue (a non-finite loss, an empty epoch): one line, exit 1."""
