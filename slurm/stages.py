"""How the sweep calls each stage, and the resolved description of one job: no torch, no submitit.

The stages keep one contract (:class:`pretrain.runtime.stage.StageCommand`): ``run(argv) -> Outcome``
in-process, ``--out DIR``, and the resume flags and checkpoint files each stage's command declares
(``resume_argv``, ``checkpoint_files``), which the sweep asks the stage for rather than keeping copies.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from .sweep import COMMAND

__all__ = ["STAGE_MODULES", "JobSpec", "has_checkpoint", "stage_command"]

# The module of each stage whose ``COMMAND`` (a StageCommand) a job runs; importing it imports no torch.
STAGE_MODULES = {"pretrain": "pretrain.__main__", "cls": "downstream.cls.__main__", "det": "downstream.det.train"}


def stage_command(stage: str) -> Any:
    """The :class:`~pretrain.runtime.stage.StageCommand` of ``stage`` (``pretrain``, ``cls``, ``det``)."""
    return importlib.import_module(STAGE_MODULES[stage]).COMMAND


def has_checkpoint(stage: str, out: str) -> bool:
    """Whether ``out`` holds a checkpoint the stage can resume (the files its command names)."""
    return any(os.path.exists(os.path.join(out, name)) for name in stage_command(stage).checkpoint_files)


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
        module = STAGE_MODULES[self.stage].removesuffix(".__main__")
        return [python, "-m", module, *self.stage_argv()]

    def stage_argv(self) -> list[str]:
        """The stage's argv: ``--out`` and, when resuming, the stage's resume flags first (before any trailing
        ``KEY VALUE`` pairs of Detectron2 options), then the sweep's flags."""
        resume = self.resume or has_checkpoint(self.stage, self.out)
        return ["--out", self.out, *(stage_command(self.stage).resume_argv if resume else ()), *self.argv]
