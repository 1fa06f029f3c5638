"""ImageNet fine-tuning and linear probing with timm: ``python -m downstream.cls --model resnet50 --weights DST|none
--data /path/imagenet --recipe table7 --out runs/r50-cls [--resume auto] [--eval-only] [--protocol linear]``.

Single process, ``torchrun --nproc_per_node N -m downstream.cls ...``, or one task per GPU inside a SLURM step (or
a submitit job, which calls :func:`run` in-process). See :mod:`downstream.cls.runner` for what a run writes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pretrain.runtime.stage import StageCommand, parser_with_config

from .config import BUNDLED_RECIPES, SCHEMA, ClsConfig, resolve_config

__all__ = ["COMMAND", "build_parser", "main", "run"]

PROG = "python -m downstream.cls"
DESCRIPTION = (
    "Fine-tune (or linear-probe) a timm classifier from SparK weights on an ImageNet-layout data root (train/ and "
    "val/). Values come from --recipe and are overridden by the flags given. Writes OUT/config.json, metrics.jsonl, "
    "tensorboard/, checkpoint-last.pth and, on completion, result.json. Exit codes: 0 done (or stopped by a signal "
    "after saving), 1 runtime error, 2 usage error."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m downstream.cls`` parser: ``--recipe``, ``--print-config`` and one flag per config field."""
    recipe = {"flag": "--recipe", "default": None,
              "help": f"bundled recipe ({', '.join(BUNDLED_RECIPES)}) or a YAML file [default: linear with "
                      "--protocol linear, table8 for convnext*, else table7]"}
    return parser_with_config(PROG, DESCRIPTION, lambda parser: SCHEMA.add_arguments(parser, BUNDLED_RECIPES), recipe)


def _resolve(args: dict[str, Any], world_size: int) -> ClsConfig:
    return resolve_config(args.pop("recipe"), args, world_size=world_size)


def _execute(cfg: ClsConfig, env: Any, stop: Any) -> Any:
    from .runner import finetune  # torch and timm load only when a run starts

    return finetune(cfg, env, stop)


COMMAND = StageCommand(PROG, build_parser, _resolve, _execute)
run = COMMAND.run
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
