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

    prog = "python -m downstream.cls"
    description = (
        "Fine-tune (or linear-probe) a timm classifier from SparK weights on an ImageNet-layout data root (train/ "
        "and val/). Values come from --config (a recipe) and are overridden by the flags given. Writes "
        "OUT/config.json, metrics.jsonl, tensorboard/, checkpoint-last.pth and, on completion, result.json. Exit "
        "codes: 0 done (or stopped by a signal after saving), 1 runtime error, 2 usage error.")
    schema = SCHEMA
    config_aliases = ("--recipe",)
    config_help = (f"bundled recipe ({', '.join(BUNDLED_RECIPES)}) or a YAML file [default: linear with --protocol "
                   "linear, table8 for convnext*, else table7]")
    show_presets = BUNDLED_RECIPES

    def resolve(self, preset: str | None, overrides: Mapping[str, Any], target: RunTarget) -> ClsConfig:
        return resolve_config(preset, overrides, world_size=target.world_size)

    def check_run(self, cfg: ClsConfig) -> None:
        super().check_run(cfg)
        require_data(cfg)
        if not cfg.weights:
            raise ConfigError("--weights is required: a converted file (python -m downstream.convert timm SRC DST), "
                              "encoder_timm.pth, or none to train from scratch" if not cfg.eval_only else
                              "--eval-only needs --weights FILE (a fine-tuning checkpoint or classifier weights)")

    def facts(self, cfg: ClsConfig, target: RunTarget) -> dict[str, Any]:
        return {**super().facts(cfg, target), "sync_bn": cfg.sync_bn and target.world_size > 1}

    def summary(self, cfg: ClsConfig) -> str:
        return f"{cfg.describe_batch()}, SyncBN {'on' if cfg.sync_bn and cfg.world_size > 1 else 'off'}"

    def execute(self, cfg: ClsConfig, env: Any, stop: Any) -> Any:
        from .runner import finetune  # torch and timm load only when a run starts

        return finetune(cfg, env, stop)


COMMAND = ClsCommand()
build_parser = COMMAND.build_parser
run = COMMAND.run
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
