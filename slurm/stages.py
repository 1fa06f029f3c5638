"""How the sweep calls each stage, and the resolved description of one job: no torch, no submitit.

The stages keep one contract (see the team plan): ``run(argv) -> Outcome`` in-process, ``--out DIR``, and a
resume flag that continues from the run folder's last checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .sweep import COMMAND

__all__ = ["STAGE_ENTRIES", "JobSpec", "StageEntry", "has_checkpoint"]


@dataclass(frozen=True)
class StageEntry:
    """How the sweep calls a stage: the module with ``run(argv)``, its resume flags, and the files whose presence
    in the run folder means there is a checkpoint to continue from."""

    module: str
    resume: tuple[str, ...]
    checkpoints: tuple[str, ...]


LAST = ("checkpoint-last.pth", "checkpoint-last.pth.prev")  # pretrain.runtime.checkpoint.find_checkpoint's files
STAGE_ENTRIES = {
    "pretrain": StageEntry("pretrain.__main__", ("--resume", "auto"), LAST),
    "cls": StageEntry("downstream.cls.__main__", ("--resume", "auto"), LAST),
    "det": StageEntry("downstream.det.train", ("--resume",), LAST),
}


def has_checkpoint(stage: str, out: str) -> bool:
    """Whether ``out`` holds a checkpoint the stage can resume."""
    return any(os.path.exists(os.path.join(out, name)) for name in STAGE_ENTRIES[stage].checkpoints)


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs, resolved: the stage, its argv (``--out`` first), the run folder, and for
    ``command`` jobs the module and the files that mark the step done."""

    name: str
    stage: str
    argv: tuple[str, ...]
    out: str
    module: str = ""
    creates: tuple[str, ...] = ()
    nodes: int = 1
    gpus_per_node: int = 0
    per_node: bool = False  # one task per node that spawns its GPU workers (Detectron2's launch)
    resume: bool = False

    def command_line(self, python: str = "python") -> list[str]:
        """The equivalent shell command (plans and logs show ``python``; command jobs run it with their own)."""
        if self.stage == COMMAND:
            return [python, "-m", self.module, *self.argv]
        module = STAGE_ENTRIES[self.stage].module.removesuffix(".__main__")
        return [python, "-m", module, *self.stage_argv()]

    def stage_argv(self) -> list[str]:
        """The stage's argv: ``--out`` and, when resuming, the resume flags first (before any trailing
        ``KEY VALUE`` pairs of Detectron2 options), then the sweep's flags."""
        entry = STAGE_ENTRIES[self.stage]
        resume = self.resume or has_checkpoint(self.stage, self.out)
        return ["--out", self.out, *(entry.resume if resume else ()), *self.argv]


