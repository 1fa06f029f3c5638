"""Starting a pretraining run from existing weights (``--init-weights FILE``, also ``--weights FILE``).

The file is read once through :func:`pretrain.weights.read_weights` (any layout it knows: encoder only, or with a
SparK decoder, e.g. the released ``*_withdecoder_1kpretrained_spark_style.pth``) and loaded into the freshly built
SparK model; the run still starts at epoch 0 with a fresh optimiser and schedule. A checkpoint to resume from wins:
the file is then not read (the checkpoint already holds the run's weights), and a log line says so.

``densify_proj: auto`` is settled here: the file's own projections where it has a decoder (``published`` for the
released files), else ``width``; a resumed run keeps the value its run folder's ``config.json`` recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from typing import Any

from iopath.common.file_io import PathManager

from .config import PretrainConfig
from .runtime.config import ConfigError
from .runtime.io import read_json

__all__ = ["KEYS_SHOWN", "StartWeights", "load_start_weights", "start_weights"]

logger = logging.getLogger("pretrain")
KEYS_SHOWN = 4  # key names a log line shows besides the count
DEFAULT_PROJ = "width"


@dataclasses.dataclass(frozen=True)
class StartWeights:
    """The run's config with ``densify_proj`` settled, and the weights to load (None: none, or resuming)."""

    cfg: PretrainConfig
    weights: Any  # pretrain.weights.Weights | None


def _recorded_proj(resume_from: str, pm: PathManager) -> str:
    """``densify_proj`` of the run the checkpoint belongs to (its folder's ``config.json``), ``width`` if unsaid."""
    try:
        value = read_json(posixpath.join(posixpath.dirname(resume_from), "config.json"), pm).get(
            "densify_proj", DEFAULT_PROJ)
    except (OSError, ValueError, AttributeError):
        return DEFAULT_PROJ
    return value if value in ("width", "published") else DEFAULT_PROJ


def _file_proj(weights: Any) -> str | None:
    """The projections of the file's decoder (None: the file has no decoder)."""
    return (weights.spark or {}).get("densify_proj", DEFAULT_PROJ) if weights.decoder else None


def start_weights(cfg: PretrainConfig, resume_from: str | None, pm: PathManager | None = None) -> StartWeights:
    """Read ``cfg.init_weights`` unless the run resumes, and settle ``densify_proj``.

    Raises :class:`~pretrain.weights.WeightsError` for a missing, unreadable or unsafe file, one of no known layout
    or of another architecture than ``cfg.model``, and :class:`ConfigError` when ``--densify-proj`` contradicts the
    file's decoder.
    """
    if resume_from:
        if cfg.init_weights:
            logger.info("resuming from %s: --init-weights %s is not read (the checkpoint holds the run's weights)",
                        resume_from, cfg.init_weights)
        if cfg.densify_proj == "auto":
            cfg = dataclasses.replace(cfg, densify_proj=_recorded_proj(resume_from, pm or PathManager()))
        return StartWeights(cfg, None)
    weights = None
    if cfg.init_weights:
        from .weights import read_weights

        weights = read_weights(cfg.init_weights, cfg.model, trust=cfg.trust_weights)
    found = _file_proj(weights) if weights is not None else None
    if cfg.densify_proj == "auto":
        return StartWeights(dataclasses.replace(cfg, densify_proj=found or DEFAULT_PROJ), weights)
    if found and found != cfg.densify_proj:
        raise ConfigError(f"{cfg.init_weights} holds a decoder with {found} densify projections; --densify-proj "
                          f"{cfg.densify_proj} has no place for them (use auto or {found})")
    return StartWeights(cfg, weights)


def _keys_line(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:KEYS_SHOWN]) + (" ..." if len(keys) > KEYS_SHOWN else "")
    return f"{what}: {len(keys)} keys" + (f" ({shown})" if keys else "")


def load_start_weights(spark: Any, weights: Any) -> None:
    """Load ``weights`` into the SparK model ``spark`` (the decoder only where the file has one) and log, one line
    each, the keys left at initialisation and the keys of the file dropped. :class:`WeightsError` if they do not
    fit."""
    from .weights import load_spark_weights

    loaded = load_spark_weights(spark, weights, require_decoder=False)
    logger.info("start weights %s (%s layout) loaded at epoch 0 with a fresh optimiser", weights.path, weights.layout)
    logger.info("%s", _keys_line("start weights: left at initialisation", loaded.missing))
    logger.info("%s", _keys_line("start weights: dropped from the file", loaded.dropped))
