"""SparK's own files: the pretraining checkpoint and ``encoder_timm.pth``, and reading either back.

``encoder_timm.pth`` is ``{"state_dict": timm keys, "model_name": str, "meta": {...}}`` and loads strictly
into ``timm.create_model(model_name, num_classes=0)``. ``checkpoint-last.pth`` (written through
:mod:`pretrain.runtime.checkpoint`) holds the whole SparK model under ``model`` and the resolved config.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from .runtime.checkpoint import CheckpointError, load_torch

__all__ = [
    "ENCODER",
    "ENCODER_PREFIX",
    "EncoderWeights",
    "encoder_payload",
    "load_spark_checkpoint",
    "read_encoder_weights",
    "read_spark_checkpoint",
]

ENCODER = "encoder_timm.pth"
ENCODER_PREFIX = "encoder.model."  # where the timm encoder's keys sit in the SparK model's state dict
SPARK_CHECKPOINT = "SparK checkpoint"
# Config keys a checkpoint must hold for the model to be rebuilt from it.
REBUILD_KEYS = ("model", "input_size", "decoder_width", "mask_ratio", "densify_norm", "masking", "hierarchy", "ape",
                "loss_on")


class EncoderWeights(NamedTuple):
    """A pretrained encoder: timm model name, its timm state dict (no classifier), and where it came from."""

    model_name: str
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


def encoder_payload(encoder_state: dict[str, torch.Tensor], model_name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Content of ``encoder_timm.pth``: ``state_dict`` (timm keys) plus ``model_name`` and ``meta``.

    Load with ``timm.create_model(ckpt['model_name'], num_classes=0).load_state_dict(ckpt['state_dict'])``
    (strict), or ``timm.models.load_checkpoint(model, path)``. Only tensors and plain Python values are
    stored, so ``torch.load(..., weights_only=True)`` reads it.
    """
    return {
        "state_dict": {key: value.detach().cpu().clone() for key, value in encoder_state.items()},
        "model_name": model_name,
        "meta": meta,
    }


def read_spark_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A pretraining checkpoint (``model`` state dict and ``config``); :class:`CheckpointError` if it is not one."""
    checkpoint = load_torch(str(path), required=("model", "config"), kind=SPARK_CHECKPOINT)
    config = checkpoint["config"]
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path} is not a {SPARK_CHECKPOINT}: its 'config' names no model")
    return checkpoint


def read_encoder_weights(path: str | os.PathLike) -> EncoderWeights:
    """The timm encoder of ``encoder_timm.pth`` or of a pretraining ``checkpoint-last.pth``.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, or neither kind.
    """
    loaded = load_torch(str(path), kind="checkpoint")
    if isinstance(loaded, dict) and {"state_dict", "model_name"} <= loaded.keys():
        return EncoderWeights(loaded["model_name"], dict(loaded["state_dict"]), dict(loaded.get("meta") or {}))
    if isinstance(loaded, dict) and {"model", "config"} <= loaded.keys() and isinstance(loaded["config"], dict):
        state = {k[len(ENCODER_PREFIX):]: v for k, v in loaded["model"].items() if k.startswith(ENCODER_PREFIX)}
        if not state:
            raise CheckpointError(f"{path} holds no '{ENCODER_PREFIX}*' weights: not a {SPARK_CHECKPOINT}")
        meta = {"epoch": loaded.get("epoch"), "iteration": loaded.get("iteration"), "config": loaded["config"],
                "method": "SparK"}
        return EncoderWeights(loaded["config"]["model"], state, meta)
    found = sorted(loaded)[:8] if isinstance(loaded, dict) else type(loaded).__name__
    raise CheckpointError(f"{path} is neither {ENCODER} (state_dict, model_name) nor a {SPARK_CHECKPOINT} "
                          f"(model, config); found {found}")


def load_spark_checkpoint(path: str | os.PathLike, mask_ratio: float | None = None):  # -> tuple[SparK, dict]
    """Rebuild the SparK model saved in ``path`` in eval mode; returns ``(model, config)``.

    ``mask_ratio`` overrides the saved ratio (it holds no weights). Raises :class:`CheckpointError` naming
    the file if it is missing, unreadable, or does not match its config.
    """
    from .spark import build_spark_from_config

    checkpoint = read_spark_checkpoint(path)
    config = checkpoint["config"]
    missing = [key for key in REBUILD_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"{path} is not a {SPARK_CHECKPOINT}: its config lacks {', '.join(missing)}")
    overrides = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
    try:
        model = build_spark_from_config(config, **overrides)
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"cannot rebuild {config['model']} from {path}: {error}") from error
    return model.eval(), config
