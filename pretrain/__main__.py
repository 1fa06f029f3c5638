"""SparK pretraining: ``python -m pretrain --model resnet50 --data DIR --out runs/r50 [--config paper|tiny]``.

Single process, ``torchrun --nproc_per_node N -m pretrain ...``, or one task per GPU inside a SLURM step
(or a submitit job, which calls :func:`run` in-process). See :mod:`pretrain.runner` for what a run writes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from .config import BUNDLED_PRESETS, SCHEMA, PretrainConfig, require_data, resolve_config
from .runtime.stage import RunTarget, StageCommand

__all__ = ["COMMAND", "PretrainCommand", "build_parser", "main", "run"]


class PretrainCommand(StageCommand):
    """``python -m pretrain``: the stage contract of :mod:`pretrain.runtime.stage` for SparK pretraining."""

    prog = "python -m pretrain"
    description = (
        "SparK pretraining of a timm convnet (paper section 4.1). Values come from --config (a preset) and are "
        "overridden by the flags given. Writes OUT/config.json, metrics.jsonl, tensorboard/, checkpoint-last.pth, "
        "encoder_timm.pth and, on completion, result.json.")
    schema = SCHEMA
    config_aliases = ("--preset",)
    config_default = "paper"
    config_help = ("bundled preset (paper: section 4.1, needs --data; tiny: the embedded demo) or a YAML file "
                   "[paper]")
    show_presets = BUNDLED_PRESETS
    runner = "pretrain.runner:pretrain"

    def resolve(self, preset: str | None, overrides: Mapping[str, Any], target: RunTarget) -> PretrainConfig:
        return resolve_config(preset or "paper", overrides, world_size=target.world_size,
                              check_model=not target.planning)

    def check_run(self, cfg: PretrainConfig) -> None:
        super().check_run(cfg)
        require_data(cfg)

    def synced_batchnorm(self, cfg: PretrainConfig, world_size: int) -> bool:
        return world_size > 1  # the sparse and the decoder BatchNorms sum their statistics over ranks


COMMAND = PretrainCommand()
build_parser, run, main = COMMAND.build_parser, COMMAND.run, COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
