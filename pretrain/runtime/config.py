"""Configuration as data, for every stage: a frozen dataclass of settings, YAML presets, command-line flags.

A stage declares its settings as a frozen ``kw_only`` dataclass deriving from :class:`RunConfig` (the settings
every stage shares: run folder, resume, precision, device, stop signals) or :class:`TrainingRunConfig` (those of
the epoch-based training stages too: seed, data workers, checkpoints, logs, model, augmentation range, lr and its
schedule, global batch), each field made with :func:`setting` (its help text, choices and flag shape live beside
it). A :class:`ConfigSchema` ties the dataclass to a package of YAML presets and resolves a run's configuration
once:

1. the preset (``<package>/<name>.yaml``, or a path to a YAML file), following ``base:`` links;
2. its ``per_model`` entries (``{match: <glob>, set: {...}}``) whose glob matches the model name, in order;
3. explicit overrides (command-line flags, a launcher);
4. type checks of every value against its field's annotation, choices, :meth:`RunConfig.validate`;
5. the derived values for the ranks it will run on (:meth:`RunConfig.derive`: global batch, accumulation,
   peak lr), then the stage's own (computed by the stage after :meth:`ConfigSchema.resolve`).

The result is a value: frozen, sequences stored as tuples. What a run finds out later (the precision chosen on
its device, the classes of its data) is recorded beside it (:func:`run_record`), never written into it.
Nothing here imports torch, so the sweep and the result tables can read and build configurations.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from .errors import UsageError
from .signals import parse_signals

__all__ = [
    "AMP_CHOICES",
    "CHANNELS_LAST_CHOICES",
    "DEFAULT_STOP_SIGNALS",
    "DEMO_DATA",
    "ConfigError",
    "ConfigSchema",
    "PresetStore",
    "RunConfig",
    "TrainingRunConfig",
    "check_value",
    "require_all",
    "run_record",
    "setting",
]

AMP_CHOICES = ("auto", "bf16", "none")
CHANNELS_LAST_CHOICES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
# SIGTERM: preemption on plain SLURM and `kill`; SIGUSR1: `sbatch --signal=USR1@120`; SIGUSR2: submitit's
# preemption / time-out signal.
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
DEMO_DATA = "demo"  # the value of ``data`` that names the embedded demo set (only the ``tiny`` presets set it)


class ConfigError(UsageError):
    """A configuration that cannot run: unknown key, bad value, inconsistent sizes, unknown model or preset."""


def setting(help_text: str, default: Any = dataclasses.MISSING, choices: Sequence[str] | None = None,
            **meta: Any) -> Any:
    """A dataclass field with its command-line help, ``choices`` and flag shape (``nargs``, ``metavar``).

    ``derived=True`` marks a value the stage computes (not settable); ``internal=True`` one set by the runner;
    ``positional=True`` a field given as trailing command-line words (Detectron2's ``KEY VALUE`` pairs);
    ``aliases=("--other",)`` more flags for the same field.
    """
    meta = {"help": help_text, "choices": tuple(choices) if choices else None, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (JSON's view of a config)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def require_all(checks: Sequence[tuple[bool, str]]) -> None:
    """Raise :class:`ConfigError` with the message of the first ``(ok, message)`` that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Settings every stage shares. Stage dataclasses derive from it and add their own."""

    # --- run
    out: str = setting("run folder (config, metrics, checkpoints, result)", "")
    resume: str = setting("continue a run: bare or 'auto' from OUT/checkpoint-last.pth if present, or a checkpoint "
                          "path", "", nargs="?", const="auto", metavar="auto|PATH")
    stop_signals: tuple[str, ...] = setting("signals that save a checkpoint and stop cleanly", DEFAULT_STOP_SIGNALS,
                                            nargs="+", metavar="SIG")
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
    world_size: int = setting("number of ranks the config was resolved for", 1, derived=True)

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line) for a value no run can use; stages extend it."""
        try:
            parse_signals(self.stop_signals)
        except ValueError as error:
            raise ConfigError(f"stop_signals: {error}") from None
        require_all([(self.dist_timeout_min > 0, f"dist_timeout_min must be positive, got {self.dist_timeout_min}")])

    def derive(self, world_size: int) -> RunConfig:
        """This config resolved for ``world_size`` ranks (the derived fields filled in)."""
        return dataclasses.replace(self, world_size=world_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples as lists)."""
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        """Indented JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2)


def run_record(cfg: RunConfig, **facts: Any) -> dict[str, Any]:
    """What ``config.json``, the checkpoints and ``result.json`` store: the config's fields and, beside them, what
    the run found out (``precision``, ``num_classes``...). A fact never replaces a config field."""
    record = cfg.to_dict()
    clash = sorted(set(facts) & set(record))
    if clash:
        raise ValueError(f"run facts {clash} would replace config fields")
    return {**record, **_plain(facts)}


@dataclass(frozen=True, kw_only=True)
class TrainingRunConfig(RunConfig):
    """A :class:`RunConfig` with what every epoch-based training stage shares (pretraining, fine-tuning): the run's
    seed, data workers, checkpoints and logs, the model and its stochastic depth, the crop range, the lr (peak lr
    linear in the global batch) with its warm-up + cosine schedule, weight decay, and the global batch split into
    per-rank forward passes. Validated and derived here, in one place, for every stage."""

    # --- run, checkpoints and logs
    seed: int = setting("random seed", 0)
    workers: int = setting("data loader worker processes per rank", 8)
    save_every: int = setting("save checkpoint-last.pth every N optimiser steps (0: only at epoch ends)", 500)
    snapshot_every: int = setting("also keep checkpoint-epNNNN.pth every N epochs (0: never)", 0)
    log_every: int = setting("write metrics every N optimiser steps", 20)
    tensorboard: bool = setting("write TensorBoard scalars to OUT/tensorboard", True)
    progress: bool = setting("show a progress bar on the main rank", True)
    # --- model and augmentation
    model: str = setting("timm model name")
    drop_path: float = setting("stochastic depth rate")
    scale: tuple[float, ...] = setting("RandomResizedCrop area range, two numbers", nargs=2, metavar=("LOW", "HIGH"))
    # --- optimisation
    lr_base: float = setting("peak lr at a global batch of lr_base_size; scaled linearly with the global batch")
    lr_base_size: int = setting("global batch at which lr_base holds")
    lr: float | None = setting("absolute peak lr (none: lr_base x global_batch / lr_base_size)", None)
    weight_decay: float = setting("weight decay (not on biases and norm parameters); with weight_decay_end: its "
                                  "start")
    weight_decay_end: float | None = setting("weight decay at the end of a cosine from weight_decay (none: constant)",
                                             None)
    momentum: float = setting("SGD momentum")
    clip_grad: float = setting("clip the global gradient norm to this value (0: no clipping)")
    # --- schedule and batch
    epochs: int = setting("training epochs")
    warmup_epochs: float = setting("linear lr warm-up epochs")
    warmup_lr_ratio: float = setting("warm-up starts at this fraction of the peak lr")
    min_lr_ratio: float = setting("the cosine ends at this fraction of the peak lr")
    sched_on_updates: bool = setting("step the lr (and weight decay) schedule every optimiser step; "
                                     "--no-sched-on-updates: once per epoch (timm's flag)", True)
    global_batch: int = setting("images per optimiser step over all ranks (with gradient accumulation)")
    batch_size: int = setting("images per rank per forward pass")
    # --- derived at resolution (not settable)
    peak_lr: float = setting("peak learning rate actually used", 0.0, derived=True)
    grad_accum_steps: int = setting("forward passes per optimiser step on each rank", 1, derived=True)

    def validate(self) -> None:
        super().validate()
        require_all([
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.global_batch > 0, f"global_batch must be positive, got {self.global_batch}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (0 <= self.warmup_epochs <= self.epochs, f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}"),
            (self.warmup_lr_ratio >= 0 and self.min_lr_ratio >= 0, "warmup_lr_ratio and min_lr_ratio must be >= 0"),
            (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
             f"scale must be two numbers 0 < low <= high <= 1, got {list(self.scale)}"),
            (0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}"),
            (self.lr_base > 0 and self.lr_base_size > 0, "lr_base and lr_base_size must be positive"),
            (self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0 and (self.weight_decay_end is None or self.weight_decay_end >= 0),
             "weight_decay and weight_decay_end must be >= 0"),
            (self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.log_every > 0, f"log_every must be positive, got {self.log_every}"),
            (self.save_every >= 0 and self.snapshot_every >= 0, "save_every and snapshot_every must be >= 0"),
        ])

    def derive(self, world_size: int) -> TrainingRunConfig:
        """Global batch = batch_size x world_size x grad_accum_steps (exactly); peak lr = lr, or lr_base scaled by
        global_batch / lr_base_size."""
        per_step = self.batch_size * world_size
        if self.global_batch % per_step:
            raise ConfigError(f"global_batch {self.global_batch} is not a multiple of batch_size x world_size = "
                              f"{self.batch_size} x {world_size}; change --batch-size or --global-batch")
        peak_lr = self.lr if self.lr is not None else self.lr_base * self.global_batch / self.lr_base_size
        if not math.isfinite(peak_lr):
            raise ConfigError(f"peak lr is not finite: {peak_lr}")
        return dataclasses.replace(self, world_size=world_size, grad_accum_steps=self.global_batch // per_step,
                                   peak_lr=peak_lr)

    def describe_batch(self) -> str:
        """``global batch G = b x N ranks x A accum, peak lr X`` (logs, the sweep's dry run)."""
        return (f"global batch {self.global_batch} = {self.batch_size} x {self.world_size} ranks x "
                f"{self.grad_accum_steps} accum, peak lr {self.peak_lr:.3g}")


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
    "tuple[float, ...]": {"type": float, "nargs": "+"},
    "tuple[int, ...]": {"type": int, "nargs": "+"},
    "tuple[str, ...]": {"nargs": "+"},
}
SEQUENCE = re.compile(r"(?:list|tuple)\[(\w+)(?:, \.\.\.)?\]")
KINDS = {"bool": ((bool,), "true or false"), "int": ((int,), "an integer"), "float": ((int, float), "a number"),
         "str": ((str,), "a string")}


def _scalar(name: str, kind: str, value: Any, where: str) -> Any:
    types, noun = KINDS[kind]
    if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
        raise ConfigError(f"{where}: {name} must be {noun}, got {value!r}")
    return float(value) if kind == "float" else value


def check_value(name: str, annotation: str, value: Any, where: str) -> Any:
    """``value`` checked against a field's type ``annotation`` (``float | None``, ``tuple[float, ...]``...), ints
    widened to floats and sequences made tuples; :class:`ConfigError` naming ``where``, the field and the value."""
    base = annotation.removesuffix(" | None")
    if value is None:
        if base != annotation:
            return None
        raise ConfigError(f"{where}: {name} must be set, got null")
    sequence = SEQUENCE.fullmatch(base)
    if sequence:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        return tuple(_scalar(name, sequence.group(1), item, where) for item in value)
    if base in KINDS:
        return _scalar(name, base, value, where)
    if base.startswith("dict") and not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} must be a mapping, got {value!r}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


class ConfigSchema(Generic[C]):
    """A stage's configuration: its dataclass ``cls``, its presets (None: defaults and overrides only), and the
    name of its model field."""

    def __init__(self, cls: type[C], presets: PresetStore | None, model_key: str = "model") -> None:
        self.cls, self.presets, self.model_key = cls, presets, model_key

    @property
    def noun(self) -> str:
        return self.presets.noun if self.presets else "config"

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

    def preset_values(self, preset: str, model: str | None = None) -> dict[str, Any]:
        """The values ``preset`` gives a run of ``model`` (default: the preset's own): its ``base`` chain and the
        ``per_model`` entries matching the model applied."""
        values = self.presets.load(preset) if self.presets and preset else {"per_model": []}
        self._apply_per_model(values, str(model or values.get(self.model_key, "")))
        return values

    def _checked(self, values: Mapping[str, Any], where: str) -> dict[str, Any]:
        types = {f.name: f.type for f in self.fields()}
        checked = {}
        for name, value in values.items():
            if name == "channels_last" and isinstance(value, bool):  # YAML true/false
                value = "on" if value else "off"
            checked[name] = check_value(name, types[name], value, where)
        return checked

    def resolve(self, preset: str | None, overrides: Mapping[str, Any] | None = None, world_size: int = 1) -> C:
        """Preset, its matching ``per_model`` entries, then ``overrides``, type-checked and validated, derived for
        ``world_size`` ranks: a frozen config (stages may derive more with :func:`dataclasses.replace`).

        Raises :class:`ConfigError` for unknown keys, values of the wrong type or outside a field's choices, fields
        the preset leaves unset, or values :meth:`RunConfig.validate` / :meth:`RunConfig.derive` refuse.
        """
        preset = preset or ""
        overrides = dict(overrides or {})
        self.check_keys(overrides, "overrides")
        values = self.preset_values(preset, overrides.get(self.model_key))
        self.check_keys(values, f"{self.noun} {preset!r}")
        values = {**self._checked(values, f"{self.noun} {preset!r}"), **self._checked(overrides, "overrides")}
        missing = [f.name for f in self.fields() if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{self.noun} {preset!r} does not set: {', '.join(missing)}")
        name = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
        cfg = self.cls(**values, preset=name)
        for f in self.fields():
            choices = f.metadata.get("choices")
            if choices and getattr(cfg, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}; "
                                  f"got {getattr(cfg, f.name)!r}")
        cfg.validate()
        return cfg.derive(world_size)

    def add_arguments(self, parser: argparse.ArgumentParser, show_presets: Sequence[str] = (),
                      model: str | None = None) -> None:
        """One ``--flag`` per settable field (positional fields as trailing words); only what the command line
        gives becomes an override.

        Help strings show the value each preset in ``show_presets`` gives a run of ``model`` (default: the preset's
        own model), ``per_model`` entries applied (``[paper: 0.6; tiny: 0.6]``), else the field's default.
        Booleans take ``--flag`` / ``--no-flag``.
        """
        preset_values = {name: self.preset_values(name, model) for name in show_presets}
        title = f"config (defaults come from the {self.noun}; shown as [{self.noun}: value]"
        group = parser.add_argument_group(title + (f" for model {model})" if model else ")"))
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
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata["help"] + hint,
                                      **FLAG_SHAPES[f.type]}
            for key in ("choices", "nargs", "metavar", "const"):
                if f.metadata.get(key) is not None:
                    kwargs[key] = f.metadata[key]
            if f.metadata.get("positional"):
                group.add_argument(f.name, **{**kwargs, "nargs": "*"})
            else:
                group.add_argument(_flag(f.name), *f.metadata.get("aliases", ()), dest=f.name, **kwargs)

    def to_argv(self, overrides: Mapping[str, Any]) -> list[str]:
        """Command-line arguments that reproduce ``overrides`` (for launchers)."""
        self.check_keys(overrides, "overrides")
        positional = {f.name for f in self.fields() if f.metadata.get("positional")}
        argv: list[str] = []
        for name, value in overrides.items():
            flag = _flag(name)
            if name in positional:
                continue
            if isinstance(value, bool) and name != "channels_last":
                argv.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, bool):
                argv += [flag, "on" if value else "off"]
            elif isinstance(value, (list, tuple)):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, "none" if value is None else str(value)]
        return argv + [str(v) for name in positional if name in overrides for v in overrides[name]]
