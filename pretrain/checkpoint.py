"""SparK's own files: ``encoder_timm.pth`` and rebuilding the SparK model of a checkpoint for figures.

``encoder_timm.pth`` is ``{"state_dict", "model_name", "meta"}`` (:func:`pretrain.weights.timm_file_payload`):
``state_dict`` holds every key of ``timm.create_model(model_name)`` at timm's default 1000 classes, the classifier
(and any other key the encoder did not train) at timm's initialisation and listed in ``meta["untrained"]``. It
loads strictly into ``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": path})`` and
through ``timm.models.load_checkpoint``; with the classifier dropped into any ``num_classes`` (0 included).
Reading any weights file goes through :func:`pretrain.weights.read_weights`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .weights import build_spark_model, read_weights, timm_file_payload
from .weights.suite import ENCODER_PREFIX

__all__ = ["ENCODER", "ENCODER_PREFIX", "encoder_payload", "load_spark_checkpoint"]

ENCODER = "encoder_timm.pth"


def encoder_payload(encoder_state: dict[str, torch.Tensor], model_name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Content of ``encoder_timm.pth`` for the encoder weights ``encoder_state`` (timm keys, no classifier).

    Only tensors and plain Python values are stored, so ``torch.load(..., weights_only=True)`` reads it.
    """
    return timm_file_payload(encoder_state, model_name, meta)


def load_spark_checkpoint(path: str | os.PathLike, mask_ratio: float | None = None, trust: bool = False):
    """Rebuild the SparK model of ``path`` in eval mode; returns ``(model, settings)`` (``settings["model"]``, the
    timm name, and the :func:`~pretrain.spark.build_spark` arguments).

    ``path``: any file with a SparK decoder (a pretraining ``checkpoint-last.pth``, a released
    ``*_withdecoder_*_spark_style.pth``). ``mask_ratio`` overrides the saved ratio (it holds no weights). Raises
    :class:`~pretrain.weights.WeightsError` naming the file if it is missing, unreadable, holds no decoder, or
    does not match its settings.
    """
    return build_spark_model(read_weights(path, trust=trust), mask_ratio=mask_ratio)
