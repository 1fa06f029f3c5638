"""The pretraining configuration: :class:`PretrainConfig`, filled from a preset (YAML data) and overrides.

Resolution (:func:`resolve_config`): the preset (``presets/<name>.yaml``, following ``base:`` links), its
``per_model`` entries that match the model name, explicit overrides (command line or SLURM launcher), then
the derived values (peak lr, gradient accumulation, the densify norm of ``auto``). The run machinery behind
it is :mod:`pretrain.runtime.config`; the result is saved with the run as ``config.json``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .runtime.config import ConfigError, ConfigSchema, PresetStore, TrainingRunConfig, setting

__all__ = [
    "SCHEMA",
    "ConfigError",
    "PretrainConfig",
    "add_config_arguments",
    "config_fields",
    "load_preset",
    "overrides_to_argv",
    "resolve_config",
]

OPTIMIZERS = ("lamb", "adamw", "sgd")


@dataclass(kw_only=True)
class PretrainConfig(TrainingRunConfig):
    """Everything a pretraining run depends on. Hyperparameters without a default come from the preset."""

    # --- model
    model: str = setting("timm model name of the encoder (any convnet with stride-4..32 stages)")
    input_size: int = setting("training resolution in pixels (multiple of patch_size)")
    patch_size: int = setting("mask patch size; must equal the encoder's total downsampling (32)")
    mask_ratio: float = setting("fraction of patches masked")
    decoder_width: int = setting("channels entering the light decoder (divisible by 32)")
    densify_norm: str = setting("norm of the densified maps (auto: bn for BN nets, ln otherwise)",
                                choices=("auto", "bn", "ln", "none"))
    masking: str = setting("sparse (SparK) or zero (zero-outing ablation, table 5)", choices=("sparse", "zero"))
    sparse_backend: str = setting("how sparse convolutions run: masked (dense then masked) or gather (visible "
                                  "sites only; same values, slower on dense hardware)", choices=("masked", "gather"))
    hierarchy: bool = setting("decode from all four scales (false: coarsest only, table 5)")
    ape: bool = setting("add learnable absolute positional embeddings (table 5)")
    loss_on: str = setting("patches the loss covers (table 5)", choices=("masked", "all"))
    drop_path_rate: float = setting("stochastic depth rate of the encoder")
    # --- data
    data: str = setting("training images (ImageNet layout or a flat folder); empty: the embedded demo set", "")
    crop_scale: list[float] = setting("RandomResizedCrop area range, two numbers", nargs=2, metavar=("LOW", "HIGH"))
    # --- optimisation
    opt: str = setting("optimiser (timm)", choices=OPTIMIZERS)
    base_lr: float = setting("peak lr per 256 images; peak lr = base_lr x global_batch / 256")
    lr: float | None = setting("absolute peak lr (overrides base_lr scaling)")
    beta1: float = setting("first Adam/LAMB moment coefficient")
    beta2: float = setting("second Adam/LAMB moment coefficient")
    momentum: float = setting("SGD momentum")
    weight_decay: float = setting("weight decay at the start (0 disables decay)")
    weight_decay_end: float = setting("weight decay at the end of the cosine schedule")
    # schedule and batch fields: TrainingRunConfig


SCHEMA: ConfigSchema[PretrainConfig] = ConfigSchema(PretrainConfig, PresetStore("pretrain.presets"))
BUNDLED_PRESETS = ("paper", "tiny")


def config_fields(settable_only: bool = True) -> list:
    """The fields of :class:`PretrainConfig` (by default those a user or launcher may set)."""
    return SCHEMA.fields(settable_only)


def load_preset(preset: str) -> dict[str, Any]:
    """The preset's values with its ``base`` chain merged."""
    return SCHEMA.presets.load(preset)


def _model_densify_norm(cfg: PretrainConfig) -> tuple[str, int]:
    """``(densify norm, patch size)`` that :func:`pretrain.spark.build_spark` would use, built on the meta device."""
    import torch

    from .spark import build_spark_from_config

    try:
        with torch.device("meta"):
            spark = build_spark_from_config(cfg.to_dict())
    except (ValueError, NotImplementedError) as error:  # a refused layer (NotImplementedError is a RuntimeError)
        raise ConfigError(f"model {cfg.model!r}: {error}") from error
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConfigError(f"cannot build model {cfg.model!r}: {error}") from error
    return spark.densify_norm, spark.patch_size


def _validate(cfg: PretrainConfig) -> None:
    checks = [
        (cfg.batch_size > 0, f"batch_size must be positive, got {cfg.batch_size}"),
        (cfg.global_batch > 0, f"global_batch must be positive, got {cfg.global_batch}"),
        (cfg.epochs > 0, f"epochs must be positive, got {cfg.epochs}"),
        (0 <= cfg.warmup_epochs <= cfg.epochs, f"warmup_epochs must be in [0, epochs], got {cfg.warmup_epochs}"),
        (0.0 <= cfg.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {cfg.mask_ratio}"),
        (len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
         f"crop_scale must be two numbers 0 < low <= high <= 1, got {cfg.crop_scale}"),
        (cfg.workers >= 0, f"workers must be >= 0, got {cfg.workers}"),
        (cfg.clip_grad >= 0, f"clip_grad must be >= 0, got {cfg.clip_grad}"),
        (cfg.log_every > 0, f"log_every must be positive, got {cfg.log_every}"),
        (cfg.save_every >= 0 and cfg.snapshot_every >= 0, "save_every and snapshot_every must be >= 0"),
        (cfg.lr is None or cfg.lr > 0, f"lr must be positive, got {cfg.lr}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def resolve_config(
    preset: str = "paper", overrides: Mapping[str, Any] | None = None, world_size: int = 1, check_model: bool = True
) -> PretrainConfig:
    """The complete configuration of a run on ``world_size`` ranks.

    Raises :class:`ConfigError` with a one-line message for unknown keys, bad values, a global batch that
    ``batch_size x world_size`` does not divide, or a model SparK cannot wrap (``check_model``).
    """
    cfg = SCHEMA.resolve(preset, overrides)
    _validate(cfg)
    per_step = cfg.batch_size * world_size
    if cfg.global_batch % per_step:
        raise ConfigError(
            f"global_batch {cfg.global_batch} is not a multiple of batch_size x world_size = "
            f"{cfg.batch_size} x {world_size}; change --batch-size or --global-batch"
        )
    cfg.world_size, cfg.grad_accum_steps = world_size, cfg.global_batch // per_step
    cfg.peak_lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.global_batch / 256
    if check_model:
        cfg.densify_norm, patch = _model_densify_norm(cfg)
        if patch != cfg.patch_size:
            raise ConfigError(f"patch_size {cfg.patch_size} differs from {cfg.model}'s downsampling {patch}")
    if not math.isfinite(cfg.peak_lr):
        raise ConfigError(f"peak lr is not finite: {cfg.peak_lr}")
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser, presets: Sequence[str] = BUNDLED_PRESETS) -> None:
    """One ``--flag`` per settable config field, help showing each bundled preset's value."""
    SCHEMA.add_arguments(parser, presets)


def overrides_to_argv(overrides: Mapping[str, Any]) -> list[str]:
    """Command-line arguments of ``python -m pretrain`` that reproduce ``overrides`` (for launchers)."""
    return SCHEMA.to_argv(overrides)
