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
        "encoder_timm.pth and, on completion, result.json. Exit codes: 0 done (or stopped by a signal after "
        "saving), 1 runtime error, 2 usage error.")
    schema = SCHEMA
    config_aliases = ("--preset",)
    config_default = "paper"
    config_help = ("bundled preset (paper: section 4.1, needs --data; tiny: the embedded demo) or a YAML file "
                   "[paper]")
    show_presets = BUNDLED_PRESETS

    def resolve(self, preset: str | None, overrides: Mapping[str, Any], target: RunTarget) -> PretrainConfig:
        return resolve_config(preset or "paper", overrides, world_size=target.world_size,
                              check_model=not target.planning)

    def check_run(self, cfg: PretrainConfig) -> None:
        super().check_run(cfg)
        require_data(cfg)

    def facts(self, cfg: PretrainConfig, target: RunTarget) -> dict[str, Any]:
        return {**super().facts(cfg, target), "sync_bn": target.world_size > 1}

    def summary(self, cfg: PretrainConfig) -> str:
        return f"{cfg.describe_batch()}, decoder BN {'synchronised' if cfg.world_size > 1 else 'local'}"

    def execute(self, cfg: PretrainConfig, env: Any, stop: Any) -> Any:
        from .runner import pretrain  # torch and timm load only when a run starts

        return pretrain(cfg, env, stop)


COMMAND = PretrainCommand()
build_parser = COMMAND.build_parser
run = COMMAND.run
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
