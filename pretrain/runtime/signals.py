"""Stop requests from signals: SLURM sends SIGTERM (preemption) or a chosen signal such as SIGUSR1
(``--signal=USR1@120`` before the time limit); the training loop then saves a checkpoint and returns."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence

__all__ = ["StopRequest", "parse_signals"]


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1"]`` -> signal members; ``ValueError`` naming an unknown signal."""
    parsed = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not hasattr(signal.Signals, full):
            raise ValueError(f"unknown signal {name!r}")
        parsed.append(signal.Signals[full])
    return parsed


class StopRequest:
    """Remembers the first stop signal received while :meth:`installed` is active.

    The handler only records the signal; the training loop polls :attr:`signal_name` between optimiser
    steps, so a checkpoint is never written from inside a signal handler.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def request(self, name: str) -> None:
        """Ask the loop to stop (also usable without a signal, e.g. by a cluster wrapper)."""
        self.signal_name = self.signal_name or name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self, signals: Sequence[signal.Signals]) -> Iterator[StopRequest]:
        """Handle ``signals`` inside the ``with`` block; the previous handlers come back afterwards."""

        def handler(signum: int, frame: object) -> None:
            self.request(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, handler) for sig in signals}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
