"""Resources per job kind as data (``slurm/sweeps/resources.yaml``), changed by a sweep and then by flags.

Order of precedence, lowest first: ``defaults`` of resources.yaml, its ``kinds.<kind>``, the sweep's
``resources.<kind>`` (``resources.default`` applies to every kind of that sweep), the node-shape flags
(``--nodes``, ``--gpus-per-node``, ``--cpus-per-task``, ``--mem-gb``, ``--time-min``: compute kinds only), and
``--resources KIND.FIELD=VALUE``. Nothing here imports torch or submitit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .sweep import SweepError

__all__ = ["RESOURCES_FILE", "Resources", "ResourceTable", "load_resources"]

RESOURCES_FILE = Path(__file__).resolve().parent / "sweeps" / "resources.yaml"
TASK_MODES = ("per-gpu", "per-node")


@dataclass(frozen=True)
class Resources:
    """What one job asks SLURM for."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    timeout_min: int = 60
    tasks: str = "per-gpu"  # per-gpu: one task per GPU (the stage reads its rank); per-node: one task per node
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: the stage saves, submitit requeues
    max_num_timeout: int = 3  # requeues after reaching the time limit before the job gives up
    compute: bool = True  # the node-shape flags apply to this kind (not to data or table steps)

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node) if self.tasks == "per-gpu" else 1

    def describe(self) -> str:
        """Short form for plans: ``4x8 GPU, 10 CPU/task, 480 GB, 72 h``."""
        gpus = f"{self.nodes}x{self.gpus_per_node} GPU" if self.gpus_per_node else f"{self.nodes} node CPU"
        hours = f"{self.timeout_min // 60} h" if self.timeout_min % 60 == 0 else f"{self.timeout_min} min"
        return f"{gpus}, {self.cpus_per_task} CPU/task, {self.mem_gb:g} GB, {hours}"


CASTS = {"nodes": int, "gpus_per_node": int, "cpus_per_task": int, "mem_gb": float, "timeout_min": int,
         "tasks": str, "signal_delay_s": int, "max_num_timeout": int, "compute": bool}


def _cast(field: str, value: Any, where: str) -> Any:
    if field not in CASTS:
        raise SweepError(f"{where}: unknown resource {field!r} (known: {', '.join(CASTS)})")
    cast = CASTS[field]
    try:
        if cast is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            value = value.lower() in ("true", "yes", "1")
        value = cast(value)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: {field} must be {cast.__name__}, got {value!r}") from None
    if field == "tasks" and value not in TASK_MODES:
        raise SweepError(f"{where}: tasks must be one of {', '.join(TASK_MODES)}, got {value!r}")
    if cast in (int, float) and value < 0:
        raise SweepError(f"{where}: {field} must not be negative, got {value}")
    return value


def _fields(values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise SweepError(f"{where}: expected a mapping of resource fields, got {values!r}")
    return {key: _cast(key, value, f"{where}.{key}") for key, value in values.items()}


@dataclass(frozen=True)
class ResourceTable:
    """Resources of every kind after all changes; :meth:`get` answers for one kind."""

    kinds: dict[str, Resources]

    def get(self, kind: str) -> Resources:
        if kind not in self.kinds:
            raise SweepError(f"no resources for job kind {kind!r} (known: {', '.join(sorted(self.kinds))})")
        return self.kinds[kind]


def load_resources(sweep_changes: Mapping[str, Any] | None = None, shape: Mapping[str, Any] | None = None,
                   overrides: Sequence[str] = (), path: str | Path = RESOURCES_FILE) -> ResourceTable:
    """Resources per kind from ``path``, then the sweep's ``resources``, the node-shape flags (``shape``: field ->
    value, None for unset) and ``--resources KIND.FIELD=VALUE`` strings."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise SweepError(f"cannot read resources {path}: {' '.join(str(error).split())}") from None
    base = _fields(raw.get("defaults", {}), f"{path}: defaults")
    table = {kind: {**base, **_fields(values, f"{path}: kinds.{kind}")} for kind, values in raw["kinds"].items()}
    changes = dict(sweep_changes or {})
    common = _fields(changes.pop("default", {}), "sweep resources.default")
    for kind in table:
        table[kind].update(common)
    for kind, values in changes.items():
        table.setdefault(kind, dict(base)).update(_fields(values, f"sweep resources.{kind}"))
    flags = {k: v for k, v in (shape or {}).items() if v is not None}
    for values in table.values():
        if values.get("compute", True):
            values.update({k: _cast(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items()})
    for override in overrides:
        target, sep, value = override.partition("=")
        kind, dot, field = target.partition(".")
        if not sep or not dot or kind not in table:
            raise SweepError(f"--resources {override!r}: expected KIND.FIELD=VALUE with KIND one of "
                             f"{', '.join(sorted(table))}")
        table[kind][field] = _cast(field, value, f"--resources {target}")
    return ResourceTable({kind: Resources(**values) for kind, values in table.items()})
