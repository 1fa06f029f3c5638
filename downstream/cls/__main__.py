"""ImageNet fine-tuning and linear probing with timm: ``python -m downstream.cls --model resnet50 --weights DST|none
--data /path/imagenet --config table7 --out runs/r50-cls [--resume] [--eval-only] [--protocol linear]``.

Single process, ``torchrun --nproc_per_node N -m downstream.cls ...``, or one task per GPU inside a SLURM step (or
a submitit job, which calls :func:`run` in-process). See :mod:`downstream.cls.runner` for what a run writes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from pretrain.runtime.config import ConfigError
from pretrain.runtime.stage import RunTarget, StageCommand

from .config import BUNDLED_RECIPES, SCHEMA, ClsConfig, require_data, resolve_config

__all__ = ["COMMAND", "ClsCommand", "build_parser", "main", "run"]


class ClsCommand(StageCommand):
    """``python -m downstream.cls``: the stage contract of :mod:`pretrain.runtime.stage` for fine-tuning."""

    schema, runner = SCHEMA, "downstream.cls.runner:finetune"
    config_aliases, show_presets = ("--recipe",), BUNDLED_RECIPES
    config_help = (f"bundled recipe ({', '.join(BUNDLED_RECIPES)}) or a YAML file [default: linear with --protocol "
                   "linear, table8 for convnext*, else table7]")
    prog = "python -m downstream.cls"
    description = ("Fine-tune (or linear-probe) a timm classifier from SparK weights on an ImageNet-layout data root "
                   "(train/ and val/), the run folder getting config.json, metrics.jsonl, tensorboard/, "
                   "checkpoint-last.pth and, on completion, result.json. Values come from --config (a recipe), "
                   "overridden by the flags given.")

    def resolve(self, preset: str | None, overrides: Mapping[str, Any], target: RunTarget) -> ClsConfig:
        return resolve_config(preset, overrides, world_size=target.world_size)

    def check_run(self, cfg: ClsConfig) -> None:
        super().check_run(cfg)
        require_data(cfg)
        if not cfg.weights:
            raise ConfigError("--weights is required: a converted file (python -m downstream.convert timm SRC DST), "
                              "encoder_timm.pth, or none to train from scratch" if not cfg.eval_only else
                              "--eval-only needs --weights FILE (a fine-tuning checkpoint or classifier weights)")

    def synced_batchnorm(self, cfg: ClsConfig, world_size: int) -> bool:
        return cfg.sync_bn and world_size > 1


COMMAND = ClsCommand()
build_parser, run, main = COMMAND.build_parser, COMMAND.run, COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
