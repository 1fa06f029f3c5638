"""The pretraining configuration: :class:`PretrainConfig`, filled from a preset (YAML data) and overrides.

Resolution (:func:`resolve_config`): the preset (``presets/<name>.yaml``, following ``base:`` links), its
``per_model`` entries that match the model name, explicit overrides (command line or SLURM launcher), then
the derived values (peak lr, gradient accumulation, the densify norm of ``auto``). The run machinery behind
it is :mod:`pretrain.runtime.config`; the result is saved with the run as ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .runtime.config import DEMO_DATA, ConfigError, ConfigSchema, PresetStore, TrainingRunConfig, setting

__all__ = [
    "SCHEMA",
    "ConfigError",
    "PretrainConfig",
    "add_config_arguments",
    "config_fields",
    "load_preset",
    "overrides_to_argv",
    "require_data",
    "resolve_config",
]

OPTIMIZERS = ("lamb", "adamw", "sgd")
DENSIFY_PROJ_CHOICES = ("auto", "width", "published")  # auto: settled by the runner (pretrain.start_weights)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainingRunConfig):
    """Everything a pretraining run depends on. Hyperparameters without a default come from the preset; the
    fields every training stage shares (seed, schedule, lr, batch, drop_path, scale...) are
    :class:`TrainingRunConfig`'s."""

    # --- model
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
    densify_proj: str = setting("projections between densified maps and decoder of equal width: width (only where "
                                "widths differ), published (at every scale but the coarsest, as the released "
                                "*_spark_style.pth decoders), auto (the --init-weights file's, else width)", "auto",
                                choices=DENSIFY_PROJ_CHOICES)
    # --- start weights
    init_weights: str = setting("start from these weights at epoch 0 with a fresh optimiser: any file the weights "
                                "reader knows (encoder only, or with a SparK decoder); a run folder's checkpoint "
                                "wins over it on --resume", "", aliases=("--weights",), metavar="FILE")
    trust_weights: bool = setting("unpickle --init-weights fully even if it holds Python objects beyond tensors and "
                                  "plain values (that can run code from the file: only for files you trust)", False)
    # --- data
    data: str = setting(f"training images (ImageNet layout or a flat folder); '{DEMO_DATA}': the embedded demo set "
                        "(the tiny preset's)", "")
    # --- optimisation
    opt: str = setting("optimiser (timm)", choices=OPTIMIZERS)
    beta1: float = setting("first Adam/LAMB moment coefficient")
    beta2: float = setting("second Adam/LAMB moment coefficient")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.patch_size <= 0 or self.input_size % self.patch_size:
            raise ConfigError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")


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


def resolve_config(
    preset: str = "paper", overrides: Mapping[str, Any] | None = None, world_size: int = 1, check_model: bool = True
) -> PretrainConfig:
    """The complete configuration of a run on ``world_size`` ranks.

    Raises :class:`ConfigError` with a one-line message for unknown keys, bad values, a global batch that
    ``batch_size x world_size`` does not divide, or a model SparK cannot wrap (``check_model``; without it, as the
    sweep's dry run plans, no torch is imported and ``densify_norm`` may stay ``auto``).
    """
    cfg = SCHEMA.resolve(preset, overrides, world_size)
    if check_model:
        densify_norm, patch = _model_densify_norm(cfg)
        if patch != cfg.patch_size:
            raise ConfigError(f"patch_size {cfg.patch_size} differs from {cfg.model}'s downsampling {patch}")
        cfg = dataclasses.replace(cfg, densify_norm=densify_norm)
    return cfg


def require_data(cfg: PretrainConfig) -> None:
    """A run needs ``--data``: only a preset that names the embedded demo set (``tiny``) runs without it."""
    if not cfg.data:
        raise ConfigError(f"--data is required with preset {cfg.preset!r}: an ImageNet-layout or flat image folder "
                          f"(--preset tiny, or --data {DEMO_DATA}, trains on the embedded demo set)")


def add_config_arguments(parser: argparse.ArgumentParser, presets: Sequence[str] = BUNDLED_PRESETS) -> None:
    """One ``--flag`` per settable config field, help showing each bundled preset's value."""
    SCHEMA.add_arguments(parser, presets)


def overrides_to_argv(overrides: Mapping[str, Any]) -> list[str]:
    """Command-line arguments of ``python -m pretrain`` that reproduce ``overrides`` (for launchers)."""
    return SCHEMA.to_argv(overrides)
