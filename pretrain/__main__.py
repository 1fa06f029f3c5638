"""SparK pretraining: ``python -m pretrain --model resnet50 --data DIR --out runs/r50 [--preset paper|tiny]``.

Single process, ``torchrun --nproc_per_node N -m pretrain ...``, or one task per GPU inside a SLURM step
(or a submitit job, which calls :func:`run` in-process). See :mod:`pretrain.runner` for what a run writes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .config import PretrainConfig, add_config_arguments, resolve_config
from .runtime.stage import StageCommand, parser_with_config

__all__ = ["COMMAND", "build_parser", "main", "run"]

PROG = "python -m pretrain"
DESCRIPTION = (
    "SparK pretraining of a timm convnet (paper section 4.1). Values come from --preset and are overridden by the "
    "flags given. Writes OUT/config.json, metrics.jsonl, tensorboard/, checkpoint-last.pth, encoder_timm.pth and, "
    "on completion, result.json. Exit codes: 0 done (or stopped by a signal after saving), 1 runtime error, "
    "2 usage error."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pretrain`` parser: run options plus one flag per config field."""
    preset = {"flag": "--preset", "default": "paper",
              "help": "bundled preset (paper, tiny) or a YAML file [paper]"}
    return parser_with_config(PROG, DESCRIPTION, add_config_arguments, preset)


def _resolve(args: dict[str, Any], world_size: int) -> PretrainConfig:
    return resolve_config(args.pop("preset"), args, world_size=world_size)


def _execute(cfg: PretrainConfig, env: Any, stop: Any) -> Any:
    from .runner import pretrain  # torch and timm load only when a run starts

    return pretrain(cfg, env, stop)


COMMAND = StageCommand(PROG, build_parser, _resolve, _execute)
run = COMMAND.run
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
