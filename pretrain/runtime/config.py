"""Configuration as data, for every stage: a dataclass of settings, YAML presets, command-line flags.

A stage declares its settings as a ``kw_only`` dataclass deriving from :class:`RunConfig` (the settings every
stage shares: run folder, resume, seed, precision, device, checkpoints, logs, stop signals), each field made
with :func:`setting` (its help text, choices and flag shape live beside it). A :class:`ConfigSchema` ties the
dataclass to a package of YAML presets and resolves a run's configuration once:

1. the preset (``<package>/<name>.yaml``, or a path to a YAML file), following ``base:`` links;
2. its ``per_model`` entries (``{match: <glob>, set: {...}}``) whose glob matches the model name, in order;
3. explicit overrides (command-line flags, a launcher);
4. the stage's derived values (computed by the stage after :meth:`ConfigSchema.resolve`).

Nothing here imports torch, so the sweep and the result tables can read and build configurations.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from .errors import UsageError

__all__ = [
    "AMP_CHOICES",
    "CHANNELS_LAST_CHOICES",
    "DEFAULT_STOP_SIGNALS",
    "ConfigError",
    "ConfigSchema",
    "PresetStore",
    "RunConfig",
    "TrainingRunConfig",
    "setting",
]

AMP_CHOICES = ("auto", "bf16", "none")
CHANNELS_LAST_CHOICES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
# SIGTERM: preemption on plain SLURM and `kill`; SIGUSR1: `sbatch --signal=USR1@120`; SIGUSR2: submitit's
# preemption / time-out signal.
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class ConfigError(UsageError):
    """A configuration that cannot run: unknown key, bad value, inconsistent sizes, unknown model or preset."""


def setting(help_text: str, default: Any = dataclasses.MISSING, choices: Sequence[str] | None = None,
            **meta: Any) -> Any:
    """A dataclass field with its command-line help, ``choices`` and flag shape (``nargs``, ``metavar``).

    ``derived=True`` marks a value the stage computes (not settable); ``internal=True`` one set by the runner.
    """
    meta = {"help": help_text, "choices": tuple(choices) if choices else None, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class RunConfig:
    """Settings every stage shares. Stage dataclasses derive from it and add their own."""

    # --- run, checkpoints and logs
    out: str = setting("run folder (config, metrics, checkpoints, result)", "")
    resume: str = setting("'auto' continues from OUT/checkpoint-last.pth if present; or a checkpoint path", "")
    seed: int = setting("random seed", 0)
    workers: int = setting("data loader worker processes per rank", 8)
    save_every: int = setting("save checkpoint-last.pth every N optimiser steps (0: only at epoch ends)", 500)
    snapshot_every: int = setting("also keep checkpoint-epNNNN.pth every N epochs (0: never)", 0)
    log_every: int = setting("write metrics every N optimiser steps", 20)
    tensorboard: bool = setting("write TensorBoard scalars to OUT/tensorboard", True)
    progress: bool = setting("show a progress bar on the main rank", True)
    stop_signals: list[str] = setting("signals that save a checkpoint and stop cleanly",
                                      list(DEFAULT_STOP_SIGNALS), nargs="+")
    dist_timeout_min: int = setting("timeout of collective operations in minutes", 30)
    # --- precision and speed
    amp: str = setting("autocast dtype; auto: bf16 on GPUs that support it and CPUs with native bf16 "
                       "(AVX512-BF16/AMX), else none (fp32)", "auto", choices=AMP_CHOICES)
    channels_last: str = setting("channels-last memory format; auto: on where it pays off on the device",
                                 "auto", choices=CHANNELS_LAST_CHOICES, nargs="?", const="on")
    device: str = setting("device; auto: the rank's GPU if any, else CPU", "auto", choices=DEVICES)
    deterministic: bool = setting("deterministic algorithms (slower; for exact reproduction)", False)
    # --- set by the runner
    preset: str = setting("preset the run was resolved from", "", internal=True)
    world_size: int = setting("number of ranks", 1, derived=True)
    precision: dict[str, Any] = setting("precision and memory layout chosen for the device, and why", {},
                                        derived=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (the content of ``config.json``)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Indented JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2)


@dataclass(kw_only=True)
class TrainingRunConfig(RunConfig):
    """A :class:`RunConfig` with the schedule every epoch-based training stage shares (pretraining, fine-tuning):
    epochs, warm-up and cosine floor, clipping, and the global batch split into per-rank forward passes."""

    clip_grad: float = setting("clip the global gradient norm to this value (0: no clipping)")
    epochs: int = setting("training epochs")
    warmup_epochs: float = setting("linear lr warm-up epochs")
    warmup_lr_ratio: float = setting("warm-up starts at this fraction of the peak lr")
    min_lr_ratio: float = setting("the cosine ends at this fraction of the peak lr")
    global_batch: int = setting("images per optimiser step over all ranks (with gradient accumulation)")
    batch_size: int = setting("images per rank per forward pass")
    # --- derived at resolution (not settable)
    peak_lr: float = setting("peak learning rate actually used", 0.0, derived=True)
    grad_accum_steps: int = setting("forward passes per optimiser step on each rank", 1, derived=True)


C = TypeVar("C", bound=RunConfig)


class PresetStore:
    """YAML presets bundled in a package (``<name>.yaml``), or given as paths; ``noun`` names them in errors."""

    def __init__(self, package: str, noun: str = "preset") -> None:
        self.package, self.noun = package, noun

    def names(self) -> list[str]:
        """The bundled preset names, sorted."""
        return sorted(p.name[: -len(".yaml")] for p in resources.files(self.package).iterdir()
                      if p.name.endswith(".yaml"))

    def _text(self, preset: str) -> tuple[str, str]:
        path = Path(preset)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"{self.noun} file not found: {preset}")
            return path.stem, path.read_text()
        bundled = resources.files(self.package) / f"{preset}.yaml"
        if not bundled.is_file():
            raise ConfigError(f"unknown {self.noun} {preset!r}; choose one of {', '.join(self.names())} "
                              "or give a .yaml path")
        return preset, bundled.read_text()

    def load(self, preset: str) -> dict[str, Any]:
        """The preset's values with its ``base`` chain merged (``per_model`` lists concatenated, base first)."""
        seen: list[str] = []
        layers: list[dict[str, Any]] = []
        while preset:
            name, text = self._text(preset)
            if name in seen:
                raise ConfigError(f"{self.noun} {name!r} inherits from itself ({' -> '.join([*seen, name])})")
            seen.append(name)
            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"{self.noun} {name!r} is not valid YAML: {error}") from error
            if not isinstance(values, dict):
                raise ConfigError(f"{self.noun} {name!r} is not a mapping of config keys")
            layers.append(values)
            preset = values.pop("base", "")
        merged: dict[str, Any] = {"per_model": []}
        for values in reversed(layers):
            per_model = values.pop("per_model", [])
            merged.update(values)
            merged["per_model"] = merged["per_model"] + list(per_model)
        return merged


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# How a field's annotation becomes a flag (annotations are strings: ``from __future__ import annotations``).
FLAG_SHAPES: Mapping[str, Mapping[str, Any]] = {
    "bool": {"action": argparse.BooleanOptionalAction},
    "int": {"type": int},
    "float": {"type": float},
    "str": {},
    "int | None": {"type": _optional(int)},
    "float | None": {"type": _optional(float)},
    "str | None": {"type": _optional(str)},
    "list[float]": {"type": float, "nargs": "+"},
    "list[int]": {"type": int, "nargs": "+"},
    "list[str]": {"nargs": "+"},
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


class ConfigSchema(Generic[C]):
    """A stage's configuration: its dataclass ``cls``, its presets, and the name of its model field."""

    def __init__(self, cls: type[C], presets: PresetStore, model_key: str = "model") -> None:
        self.cls, self.presets, self.model_key = cls, presets, model_key

    def fields(self, settable_only: bool = True) -> list[dataclasses.Field]:
        """The dataclass fields (by default those a user or launcher may set)."""
        fields = dataclasses.fields(self.cls)
        if not settable_only:
            return list(fields)
        return [f for f in fields if not f.metadata.get("derived") and not f.metadata.get("internal")]

    def check_keys(self, values: Mapping[str, Any], where: str) -> None:
        """:class:`ConfigError` naming keys of ``values`` that are not settable fields."""
        unknown = sorted(set(values) - {f.name for f in self.fields()})
        if unknown:
            raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}")

    def _apply_per_model(self, values: dict[str, Any], model: str) -> None:
        for entry in values.pop("per_model", []):
            if not isinstance(entry, dict) or "match" not in entry or not isinstance(entry.get("set"), dict):
                raise ConfigError(f"per_model entries need 'match' and a 'set' mapping, got {entry!r}")
            if fnmatch.fnmatchcase(model, entry["match"]):
                self.check_keys(entry["set"], f"per_model entry {entry['match']!r}")
                values.update(entry["set"])

    def resolve(self, preset: str, overrides: Mapping[str, Any] | None = None) -> C:
        """Preset, its matching ``per_model`` entries, then ``overrides``, checked: the config before derivation.

        Raises :class:`ConfigError` for unknown keys, values outside a field's choices, or fields the preset
        leaves unset.
        """
        overrides = dict(overrides or {})
        self.check_keys(overrides, "overrides")
        values = self.presets.load(preset)
        self._apply_per_model(values, str(overrides.get(self.model_key, values.get(self.model_key, ""))))
        self.check_keys(values, f"{self.presets.noun} {preset!r}")
        values.update(overrides)
        missing = [f.name for f in self.fields() if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{self.presets.noun} {preset!r} does not set: {', '.join(missing)}")
        if "channels_last" in values and isinstance(values["channels_last"], bool):  # YAML true/false
            values["channels_last"] = "on" if values["channels_last"] else "off"
        name = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
        cfg = self.cls(**values, preset=name)
        for f in self.fields():
            choices = f.metadata.get("choices")
            if choices and getattr(cfg, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}; "
                                  f"got {getattr(cfg, f.name)!r}")
        return cfg

    def add_arguments(self, parser: argparse.ArgumentParser, show_presets: Sequence[str] = ()) -> None:
        """One ``--flag`` per settable field; only flags given on the command line become overrides.

        Help strings show the value of each preset in ``show_presets`` (``[paper: 0.6; tiny: 0.6]``), else the
        field's default. Booleans take ``--flag`` / ``--no-flag``.
        """
        preset_values = {name: self.presets.load(name) for name in show_presets}
        group = parser.add_argument_group(f"config (defaults come from the {self.presets.noun}; shown as "
                                          f"[{self.presets.noun}: value])")
        for f in self.fields():
            shown = [f"{p}: {_format(v[f.name])}" for p, v in preset_values.items() if f.name in v]
            if shown:
                hint = f" [{'; '.join(shown)}]"
            elif f.default is not dataclasses.MISSING:
                hint = f" [default: {_format(f.default)}]"
            elif f.default_factory is not dataclasses.MISSING:
                hint = f" [default: {_format(f.default_factory())}]"
            else:
                hint = ""
            if f.type not in FLAG_SHAPES:
                raise TypeError(f"config field {f.name} has a type without a flag shape: {f.type}")
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                      "help": f.metadata["help"] + hint, **FLAG_SHAPES[f.type]}
            for key in ("choices", "nargs", "metavar", "const"):
                if f.metadata.get(key) is not None:
                    kwargs[key] = f.metadata[key]
            group.add_argument(_flag(f.name), **kwargs)

    def to_argv(self, overrides: Mapping[str, Any]) -> list[str]:
        """Command-line arguments that reproduce ``overrides`` (for launchers)."""
        self.check_keys(overrides, "overrides")
        argv: list[str] = []
        for name, value in overrides.items():
            flag = _flag(name)
            if isinstance(value, bool) and name != "channels_last":
                argv.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, bool):
                argv += [flag, "on" if value else "off"]
            elif isinstance(value, (list, tuple)):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, "none" if value is None else str(value)]
        return argv
