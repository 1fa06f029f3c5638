"""Run logs of the main rank: ``metrics.jsonl`` (one line per logging step), TensorBoard scalars, tqdm bars."""

from __future__ import annotations

import json
import sys
from typing import Any

from iopath.common.file_io import PathManager
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .io import atomic_write, join
from .result import METRICS, read_metrics

__all__ = ["RunLogger"]

# Bookkeeping fields of a record that are not curves worth plotting.
NOT_SCALARS = ("step", "epoch", "step_in_epoch", "time", "images_seen", "skipped_images")


class RunLogger:
    """Writes metrics of the main rank; on other ranks every method is a no-op.

    ``resume_step`` (the optimiser step of the checkpoint a run resumes from) drops metrics lines written
    after that checkpoint by the interrupted run and purges the same TensorBoard steps, so the logs of a
    resumed run read as one uninterrupted run.
    """

    def __init__(self, out: str, enabled: bool, tensorboard: bool, progress: bool, resume_step: int = 0) -> None:
        self.enabled, self.progress = enabled, progress and enabled
        self.path = join(out, METRICS)
        self.pm = PathManager()
        self.writer: SummaryWriter | None = None
        if not enabled:
            return
        self._truncate(resume_step)
        if tensorboard:
            self.writer = SummaryWriter(join(out, "tensorboard"), purge_step=resume_step or None)

    def _truncate(self, resume_step: int) -> None:
        """Rewrite an existing ``metrics.jsonl`` with the complete records up to ``resume_step``."""
        if not self.pm.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path, self.pm) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda handle: handle.write(text), binary=False, pm=self.pm)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``step``) to ``metrics.jsonl`` and its numbers to TensorBoard
        (``name`` as ``train/name``, names with a slash such as ``eval/top1`` as they are)."""
        if not self.enabled:
            return
        with self.pm.open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(name if "/" in name else f"train/{name}", value, record["step"])

    def bar(self, total: int, initial: int, desc: str) -> tqdm:
        """A tqdm bar (rate, ETA) over ``total`` optimiser steps; disabled off the main rank or when asked.

        Without a terminal (cluster logs) it refreshes at most every 30 s instead of many times a second.
        """
        interactive = sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                    disable=not self.progress, mininterval=0.5 if interactive else 30.0, file=sys.stderr)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()
