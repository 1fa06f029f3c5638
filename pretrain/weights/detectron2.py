"""Detectron2's files: pickles (``.pkl``: this suite's converter output, model-zoo pickles) and model ``.pth`` files
(``model_final.pth``), and the ResNet names Detectron2 gives timm's ResNet keys, both ways.

Reading one never imports Detectron2. For detection, the file is handed on as the checkpoint
``DetectionCheckpointer`` loads; for timm, its backbone is taken out when it is in timm's names (the timm FPN
backbone, ``backbone.bottom_up.model.*``) or in the Detectron2 ResNet names :data:`RESNET_RULES` map.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .layout import Found, Layout, strip_prefix

__all__ = ["DETECTRON2_MODEL", "DETECTRON2_PICKLE", "MODEL_PREFIXES", "RESNET_RULES", "detectron2_resnet_to_timm",
           "resnet_depth", "timm_resnet_to_detectron2"]

MODEL_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.")
TIMM_BACKBONE = "backbone.bottom_up.model."  # the timm FPN backbone of downstream.det
RESNET_BACKBONE = "backbone.bottom_up."  # Detectron2's own ResNet
RESNET_KEY = re.compile(r"(stem|res\d)\.")  # Detectron2 ResNet keys (Caffe2 names use underscores)
_NORM = r"(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)"
# timm ResNet name pattern -> Detectron2 name; ``stage`` is timm's layer index + 1 (layer1 -> res2).
RESNET_RULES: tuple[tuple[str, str], ...] = (
    (r"conv1\.weight", "stem.conv1.weight"),
    (rf"bn1\.{_NORM}", "stem.conv1.norm.{param}"),
    (r"layer(?P<layer>\d)\.(?P<block>\d+)\.conv(?P<conv>\d)\.weight", "res{stage}.{block}.conv{conv}.weight"),
    (rf"layer(?P<layer>\d)\.(?P<block>\d+)\.bn(?P<conv>\d)\.{_NORM}", "res{stage}.{block}.conv{conv}.norm.{param}"),
    (r"layer(?P<layer>\d)\.(?P<block>\d+)\.downsample\.0\.weight", "res{stage}.{block}.shortcut.weight"),
    (rf"layer(?P<layer>\d)\.(?P<block>\d+)\.downsample\.1\.{_NORM}", "res{stage}.{block}.shortcut.norm.{param}"),
)
# The same rules read the other way: Detectron2 name pattern -> timm name (``layer`` is the stage - 1).
_INVERSE_RULES: tuple[tuple[str, str], ...] = (
    (r"stem\.conv1\.weight", "conv1.weight"),
    (rf"stem\.conv1\.norm\.{_NORM}", "bn1.{param}"),
    (r"res(?P<stage>\d)\.(?P<block>\d+)\.conv(?P<conv>\d)\.weight", "layer{layer}.{block}.conv{conv}.weight"),
    (rf"res(?P<stage>\d)\.(?P<block>\d+)\.conv(?P<conv>\d)\.norm\.{_NORM}", "layer{layer}.{block}.bn{conv}.{param}"),
    (r"res(?P<stage>\d)\.(?P<block>\d+)\.shortcut\.weight", "layer{layer}.{block}.downsample.0.weight"),
    (rf"res(?P<stage>\d)\.(?P<block>\d+)\.shortcut\.norm\.{_NORM}", "layer{layer}.{block}.downsample.1.{param}"),
)
_FORWARD = tuple((re.compile(pattern), template) for pattern, template in RESNET_RULES)
_INVERSE = tuple((re.compile(pattern), template) for pattern, template in _INVERSE_RULES)
DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50, (3, 4, 23, 3, True): 101,
          (3, 8, 36, 3, True): 152}


def _rename(key: str, rules: tuple[tuple[re.Pattern, str], ...]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            groups = match.groupdict()
            stage = int(groups.pop("layer")) + 1 if "layer" in groups else groups.pop("stage", None)
            layer = int(stage) - 1 if stage is not None else None
            return template.format(stage=stage, layer=layer, **groups)
    return None


def timm_resnet_to_detectron2(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(Detectron2-named entries, keys no rule maps)`` of timm ResNet weights."""
    renamed, unknown = {}, []
    for key, value in state.items():
        new = _rename(key, _FORWARD)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
    return renamed, unknown


def detectron2_resnet_to_timm(state: Mapping[str, Any]) -> dict[str, Any]:
    """timm names of Detectron2 ResNet weights (``stem.*``, ``res2.*``..); unmapped keys are kept as they are."""
    return {(_rename(key, _INVERSE) or key): value for key, value in state.items()}


def resnet_depth(renamed: Mapping[str, Any]) -> int | None:
    """ResNet depth of Detectron2-named weights from their block counts (None if not a standard depth)."""
    blocks = [len({k.split(".")[1] for k in renamed if k.startswith(f"res{stage}.")}) for stage in range(2, 6)]
    bottleneck = any(k.endswith(".conv3.weight") for k in renamed)
    return DEPTHS.get((*blocks, bottleneck))


def _tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Arrays as tensors (Detectron2 pickles hold numpy arrays); other entries are left out."""
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            out[key] = torch.from_numpy(value.copy())  # a C-contiguous, writable copy of the same shape
        elif isinstance(value, torch.Tensor):
            out[key] = value
    return out


def _backbone(model: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone of a Detectron2 state dict in timm or Detectron2-ResNet names, and which naming."""
    state = _tensors(model)
    if any(k.startswith(TIMM_BACKBONE) for k in state):
        return strip_prefix(state, TIMM_BACKBONE), "timm"
    resnet = strip_prefix(state, RESNET_BACKBONE) if any(k.startswith(RESNET_BACKBONE) for k in state) else state
    resnet = {k: v for k, v in resnet.items() if RESNET_KEY.match(k)}
    return resnet, "detectron2-resnet"


def _found(checkpoint: dict[str, Any], source: str) -> Found:
    state, naming = _backbone(checkpoint["model"])
    depth = resnet_depth(state) if naming == "detectron2-resnet" else None
    return Found(state, naming=naming, model_name=f"resnet{depth}" if depth else None, detectron2=checkpoint,
                 meta={"source": source, "author": checkpoint.get("__author__")})


def _is_pickle(obj: Any) -> bool:
    """What ``pickle`` gives for a Detectron2 ``.pkl``: ``{"model": arrays, "__author__"...}``, Caffe2 ``blobs``, or a
    flat mapping of numpy arrays."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if isinstance(obj.get("model"), Mapping) and ("__author__" in obj or "matching_heuristics" in obj):
        return True
    if isinstance(obj.get("blobs"), Mapping):
        return True
    return all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _read_pickle(obj: Mapping[str, Any]) -> Found:
    """As ``DetectionCheckpointer._load_file`` reads a ``.pkl``: converted files as they are, else Caffe2 blobs."""
    if isinstance(obj.get("model"), Mapping) and "__author__" in obj:
        return _found(dict(obj), "Detectron2 pickle")
    data = obj.get("blobs", obj)
    blobs = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return _found({"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}, "Detectron2 pickle (Caffe2)")


def _is_model(obj: Any) -> bool:
    model = obj.get("model") if isinstance(obj, Mapping) else None
    return (isinstance(model, Mapping) and bool(model)
            and all(isinstance(k, str) and k.startswith(MODEL_PREFIXES) for k in model))


def _read_model(obj: Mapping[str, Any]) -> Found:
    return _found({"model": dict(obj["model"])}, "Detectron2 model")


DETECTRON2_MODEL = Layout("detectron2-model", "a Detectron2 model .pth (model with backbone.*, roi_heads.*: "
                          "model_final.pth)", _is_model, _read_model)
DETECTRON2_PICKLE = Layout("detectron2-pickle", "a Detectron2 .pkl (python -m downstream.convert detectron2, "
                           "model-zoo pickles)", _is_pickle, _read_pickle)
