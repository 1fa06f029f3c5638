"""The detection config files as data, without Detectron2 (so without torch): names, paths, a plain reading.

:func:`config_path` finds a shipped config (``downstream/det/configs/<name>.yaml``) or a YAML file;
:func:`read_plain` reads one with its ``_BASE_`` chain merged and ``KEY VALUE`` overrides applied, as plain data
(without Detectron2's defaults), which is what the sweep's dry run shows; :func:`adapt_norms` is the one rule that
turns synchronised BatchNorm into what a run's ranks can use (Detectron2's own config goes through it too,
:func:`downstream.det.config.adapt_to_run`).
"""

from __future__ import annotations

import ast
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pretrain.runtime.errors import UsageError

__all__ = ["CONFIG_DIR", "NORM_KEYS", "adapt_norms", "config_path", "lookup", "read_plain", "shipped_configs"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SYNC_NORMS = ("SyncBN", "naiveSyncBN")
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM",
             "MODEL.TIMM.NORM")


def shipped_configs() -> list[str]:
    """Names of the shipped configs (file stems; the ``Base-*`` files are only bases)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("Base-"))


def config_path(config: str | Path) -> Path:
    """The YAML file of a shipped config name or a path; :class:`UsageError` listing the names if neither."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = CONFIG_DIR / f"{config}.yaml"
    if shipped.is_file():
        return shipped
    raise UsageError(f"unknown config {str(config)!r}: not a file, nor one of {', '.join(shipped_configs())}")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key),
                                                                                          dict) else value
    return merged


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise UsageError(f"config {path} inherits from itself")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot load config {path}: {' '.join(str(error).split())}") from None
    base = values.pop("_BASE_", None)
    return _merge(_read(path.parent / base, (*seen, path)), values) if base else values


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_plain(config: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The values ``config`` sets (``_BASE_`` chain merged, ``KEY VALUE`` ``overrides`` applied, literals parsed
    as Detectron2 parses them), without Detectron2's defaults and unchecked against its keys."""
    if len(overrides) % 2:
        raise UsageError(f"config overrides come as KEY VALUE pairs; got {len(overrides)} items: {list(overrides)}")
    values = _read(config_path(config))
    for key, text in zip(overrides[::2], overrides[1::2]):
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _literal(text)
    return values


def lookup(values: MutableMapping[str, Any], key: str, default: Any = None) -> Any:
    """``values[A][B][C]`` for ``key`` ``A.B.C``; ``default`` where a level is missing."""
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, MutableMapping) or part not in node:
            return default
        node = node[part]
    return node


def adapt_norms(values: MutableMapping[str, Any], world_size: int, device: str) -> list[str]:
    """Make the BatchNorm kinds of ``values`` (a Detectron2 ``CfgNode`` or :func:`read_plain`'s dict) runnable on
    ``world_size`` ranks of ``device``; returns one note per change. On one process every SyncBN becomes BN (same
    statistics, no process group); on several CPU processes ``SyncBN`` (CUDA only in torch) becomes Detectron2's
    ``naiveSyncBN`` (all-reduce through the gloo group)."""
    notes = []
    for key in NORM_KEYS:
        *parents, leaf = key.split(".")
        node = lookup(values, ".".join(parents))
        if not isinstance(node, MutableMapping) or leaf not in node:
            continue
        value = new = node[leaf]
        if value in SYNC_NORMS and world_size == 1:
            new = "BN"
        elif value == "SyncBN" and device == "cpu":
            new = "naiveSyncBN"
        if new != value:
            node[leaf] = new
            notes.append(f"{key} {value} -> {new} ({world_size} process{'es' if world_size > 1 else ''} on {device})")
    return notes
