"""The pretraining configuration: one dataclass, filled from a preset (YAML data) and explicit overrides.

Resolution order: the preset (``presets/<name>.yaml``, following ``base:`` links), then its ``per_model``
entries that match the model name, then explicit overrides (command line or SLURM launcher), then the
derived values (peak lr, gradient accumulation, the densify norm of ``auto``). The result is saved with
the run as ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "PretrainConfig",
    "add_config_arguments",
    "config_fields",
    "load_preset",
    "overrides_to_argv",
    "resolve_config",
]

PRESET_PACKAGE = "pretrain.presets"
OPTIMIZERS = ("lamb", "adamw", "sgd")
AMP_MODES = ("none", "bf16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, bad value, inconsistent batch sizes, unknown model."""


def _setting(help_text: str, default: Any = dataclasses.MISSING, choices: Sequence[str] | None = None,
             **kw: Any) -> Any:
    """A dataclass field with its command-line help (and choices) as metadata."""
    meta = {"help": help_text, "choices": tuple(choices) if choices else None, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class PretrainConfig:
    """Everything a pretraining run depends on. Hyperparameters without a default come from the preset."""

    # --- model
    model: str = _setting("timm model name of the encoder (any convnet with stride-4..32 stages)")
    input_size: int = _setting("training resolution in pixels (multiple of patch_size)")
    patch_size: int = _setting("mask patch size; must equal the encoder's total downsampling (32)")
    mask_ratio: float = _setting("fraction of patches masked")
    decoder_width: int = _setting("channels entering the light decoder (divisible by 32)")
    densify_norm: str = _setting("norm of the densified maps (auto: bn for BN nets, ln otherwise)",
                                 choices=("auto", "bn", "ln", "none"))
    masking: str = _setting("sparse (SparK) or zero (zero-outing ablation, table 5)", choices=("sparse", "zero"))
    sparse_backend: str = _setting("how sparse convolutions run: masked (dense then masked) or gather (visible "
                                   "sites only; same values, slower on dense hardware)", choices=("masked", "gather"))
    hierarchy: bool = _setting("decode from all four scales (false: coarsest only, table 5)")
    ape: bool = _setting("add learnable absolute positional embeddings (table 5)")
    loss_on: str = _setting("patches the loss covers (table 5)", choices=("masked", "all"))
    drop_path_rate: float = _setting("stochastic depth rate of the encoder")
    # --- data
    data: str = _setting("training images (ImageNet layout or a flat folder); empty: the embedded demo set", "")
    crop_scale: list[float] = _setting("RandomResizedCrop area range, two numbers", nargs=2)
    workers: int = _setting("data loader worker processes per rank", 8)
    # --- optimisation
    opt: str = _setting("optimiser (timm)", choices=OPTIMIZERS)
    base_lr: float = _setting("peak lr per 256 images; peak lr = base_lr x global_batch / 256")
    lr: float | None = _setting("absolute peak lr (overrides base_lr scaling)")
    beta1: float = _setting("first Adam/LAMB moment coefficient")
    beta2: float = _setting("second Adam/LAMB moment coefficient")
    momentum: float = _setting("SGD momentum")
    weight_decay: float = _setting("weight decay at the start (0 disables decay)")
    weight_decay_end: float = _setting("weight decay at the end of the cosine schedule")
    clip_grad: float = _setting("clip the global gradient norm to this value (0: no clipping)")
    epochs: int = _setting("training epochs")
    warmup_epochs: float = _setting("linear lr warm-up epochs")
    warmup_lr_ratio: float = _setting("warm-up starts at this fraction of the peak lr")
    min_lr_ratio: float = _setting("the cosine ends at this fraction of the peak lr")
    global_batch: int = _setting("images per optimiser step over all ranks (with gradient accumulation)")
    batch_size: int = _setting("images per rank per forward pass")
    # --- precision and speed
    amp: str = _setting("autocast dtype on CPU and GPU", "none", choices=AMP_MODES)
    channels_last: bool = _setting("channels-last memory format for model and images", False)
    device: str = _setting("device; auto: the rank's GPU if any, else CPU", "auto", choices=DEVICES)
    deterministic: bool = _setting("deterministic algorithms (slower; for exact reproduction)", False)
    # --- run, checkpoints and logs
    out: str = _setting("run folder (config, metrics, checkpoints, result)", "")
    resume: str = _setting("'auto' continues from OUT/checkpoint-last.pth if present; or a checkpoint path", "")
    seed: int = _setting("random seed", 0)
    save_every: int = _setting("save checkpoint-last.pth every N optimiser steps (0: only at epoch ends)", 500)
    snapshot_every: int = _setting("also keep checkpoint-epNNNN.pth every N epochs (0: never)", 0)
    log_every: int = _setting("write metrics every N optimiser steps", 20)
    tensorboard: bool = _setting("write TensorBoard scalars to OUT/tensorboard", True)
    progress: bool = _setting("show a progress bar on the main rank", True)
    stop_signals: list[str] = _setting("signals that save a checkpoint and stop cleanly", ["SIGTERM", "SIGUSR1"],
                                       nargs="+")
    dist_timeout_min: int = _setting("timeout of collective operations in minutes", 30)
    preset: str = _setting("preset the run was resolved from", "paper", internal=True)
    # --- derived at resolution (not settable)
    peak_lr: float = _setting("peak learning rate actually used", 0.0, derived=True)
    world_size: int = _setting("number of ranks", 1, derived=True)
    grad_accum_steps: int = _setting("forward passes per optimiser step on each rank", 1, derived=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (the content of ``config.json``)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Indented JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def config_fields(settable_only: bool = True) -> list[dataclasses.Field]:
    """The fields of :class:`PretrainConfig` (by default those a user or launcher may set)."""
    fields = dataclasses.fields(PretrainConfig)
    if not settable_only:
        return list(fields)
    return [f for f in fields if not f.metadata.get("derived") and not f.metadata.get("internal")]


def _preset_text(preset: str) -> tuple[str, str]:
    """``(name, yaml text)`` of a bundled preset name or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file not found: {preset}")
        return path.stem, path.read_text()
    bundled = resources.files(PRESET_PACKAGE) / f"{preset}.yaml"
    if not bundled.is_file():
        names = sorted(p.name[: -len(".yaml")] for p in resources.files(PRESET_PACKAGE).iterdir()
                       if p.name.endswith(".yaml"))
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(names)} or give a .yaml path")
    return preset, bundled.read_text()


def load_preset(preset: str) -> dict[str, Any]:
    """The preset's values with its ``base`` chain merged (``per_model`` lists are concatenated, base first)."""
    seen: list[str] = []
    layers: list[dict[str, Any]] = []
    while preset:
        name, text = _preset_text(preset)
        if name in seen:
            raise ConfigError(f"preset {name!r} inherits from itself ({' -> '.join([*seen, name])})")
        seen.append(name)
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"preset {name!r} is not a mapping of config keys")
        layers.append(values)
        preset = values.pop("base", "")
    merged: dict[str, Any] = {"per_model": []}
    for values in reversed(layers):
        per_model = values.pop("per_model", [])
        merged.update(values)
        merged["per_model"] = merged["per_model"] + list(per_model)
    return merged


def _check_keys(values: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in config_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}")


def _apply_per_model(values: dict[str, Any], model: str) -> None:
    for entry in values.pop("per_model", []):
        if not isinstance(entry, dict) or "match" not in entry or not isinstance(entry.get("set"), dict):
            raise ConfigError(f"per_model entries need 'match' and a 'set' mapping, got {entry!r}")
        if fnmatch.fnmatchcase(model, entry["match"]):
            _check_keys(entry["set"], f"per_model entry {entry['match']!r}")
            values.update(entry["set"])


def _model_densify_norm(cfg: PretrainConfig) -> tuple[str, int]:
    """``(densify norm, patch size)`` that :func:`pretrain.spark.build_spark` would use, built on the meta device."""
    import torch

    from .spark import build_spark

    try:
        with torch.device("meta"):
            spark = build_spark(cfg.model, decoder_width=cfg.decoder_width, input_size=cfg.input_size,
                                densify_norm=cfg.densify_norm, mask_ratio=cfg.mask_ratio)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConfigError(f"cannot build model {cfg.model!r}: {error}") from error
    except ValueError as error:
        raise ConfigError(f"model {cfg.model!r}: {error}") from error
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
    for name in ("opt", "amp", "device", "densify_norm", "masking", "sparse_backend", "loss_on"):
        choices = next(f for f in config_fields() if f.name == name).metadata["choices"]
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")


def resolve_config(
    preset: str = "paper", overrides: Mapping[str, Any] | None = None, world_size: int = 1, check_model: bool = True
) -> PretrainConfig:
    """The complete configuration of a run on ``world_size`` ranks.

    Raises :class:`ConfigError` with a one-line message for unknown keys, bad values, a global batch that
    ``batch_size x world_size`` does not divide, or a model SparK cannot wrap (``check_model``).
    """
    overrides = dict(overrides or {})
    _check_keys(overrides, "overrides")
    values = load_preset(preset)
    _apply_per_model(values, overrides.get("model", values.get("model", "")))
    _check_keys(values, f"preset {preset!r}")
    values.update(overrides)
    missing = [f.name for f in config_fields() if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"preset {preset!r} does not set: {', '.join(missing)}")
    cfg = PretrainConfig(**values, preset=Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset)
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _preset_hint(name: str, presets: Mapping[str, Mapping[str, Any]]) -> str:
    values = [f"{p}: {v[name]}" for p, v in presets.items() if name in v]
    return f" [{'; '.join(values)}]" if values else ""


def add_config_arguments(parser: argparse.ArgumentParser, presets: Sequence[str] = ("paper", "tiny")) -> None:
    """One ``--flag`` per settable config field; only flags given on the command line become overrides.

    Help strings show each bundled preset's value. Booleans take ``--flag`` / ``--no-flag``.
    """
    preset_values = {name: load_preset(name) for name in presets}
    group = parser.add_argument_group("config (defaults come from the preset; shown as [preset: value])")
    for f in config_fields():
        hint = _preset_hint(f.name, preset_values)
        if not hint and f.default is not dataclasses.MISSING:
            hint = f" [default: {f.default}]"
        elif not hint and f.default_factory is not dataclasses.MISSING:
            hint = f" [default: {' '.join(f.default_factory())}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"] + hint}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type in ("int", int):
            kwargs["type"] = int
        elif f.type in ("float", float):
            kwargs["type"] = float
        elif f.type == "float | None":
            kwargs["type"] = _optional_float
        elif f.type == "list[float]":
            kwargs.update(type=float, nargs=f.metadata["nargs"], metavar=("LOW", "HIGH"))
        elif f.type == "list[str]":
            kwargs.update(nargs=f.metadata["nargs"])
        group.add_argument(_flag(f.name), **kwargs)


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "null", ""):
        return None
    return float(text)


def overrides_to_argv(overrides: Mapping[str, Any]) -> list[str]:
    """Command-line arguments of ``python -m pretrain`` that reproduce ``overrides`` (for launchers)."""
    _check_keys(overrides, "overrides")
    argv: list[str] = []
    for name, value in overrides.items():
        flag = _flag(name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, "none" if value is None else str(value)]
    return argv
