"""timm ResNet weights -> Detectron2's ResNet names, in Detectron2's pickle format.

Detectron2 reads a ``.pkl`` holding ``{"model": {name: numpy array}, "__author__": str,
"matching_heuristics": True}`` (``DetectionCheckpointer`` then matches names by suffix, so ``stem.conv1.weight``
lands on ``backbone.bottom_up.stem.conv1.weight``). ResNet-50 gives 318 tensors: 53 convolutions and their 53
BatchNorms with weight, bias, running mean, running variance and ``num_batches_tracked``. The Detectron2 config
must use ``RESNETS.STRIDE_IN_1X1: False`` (timm strides in the 3x3 convolution) and a trainable norm (BN/SyncBN).

Every key must map: a key no rule knows is an error naming it (the classifier ``fc.*`` of a classification
checkpoint is dropped and reported). ConvNeXt and other timm convnets need no conversion: the timm backbone of
:mod:`downstream.det.backbone` loads timm names directly.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from pretrain.runtime.io import atomic_write

from .to_timm import ConvertError, key_examples, read_timm_weights

__all__ = ["AUTHOR", "CLASSIFIER_PREFIX", "RESNET_RULES", "convert_to_detectron2", "rename_resnet", "resnet_depth"]

AUTHOR = "SparK suite (python -m downstream.convert detectron2)"
CLASSIFIER_PREFIX = "fc."
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
_COMPILED = tuple((re.compile(pattern), template) for pattern, template in RESNET_RULES)
DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50, (3, 4, 23, 3, True): 101,
          (3, 8, 36, 3, True): 152}


def _rename(key: str) -> str | None:
    for pattern, template in _COMPILED:
        match = pattern.fullmatch(key)
        if match:
            groups = match.groupdict()
            stage = int(groups["layer"]) + 1 if "layer" in groups else None
            return template.format(stage=stage, **groups)
    return None


def rename_resnet(state: Mapping[str, torch.Tensor], source: str = "weights") -> tuple[dict[str, Any], list[str]]:
    """``(Detectron2-named state, dropped classifier keys)``; :class:`ConvertError` naming unmappable keys."""
    renamed, dropped, unknown = {}, [], []
    for key, value in state.items():
        new = _rename(key)
        if new is not None:
            renamed[new] = value
        elif key.startswith(CLASSIFIER_PREFIX):
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConvertError(f"{source}: {len(unknown)} keys have no Detectron2 ResNet name ({key_examples(unknown)}); "
                           "only timm ResNets (resnet18..152) convert, other convnets use the timm backbone")
    return renamed, dropped


def resnet_depth(renamed: Mapping[str, Any]) -> int | None:
    """ResNet depth of Detectron2-named weights from their block counts (None if not a standard depth)."""
    blocks = [len({k.split(".")[1] for k in renamed if k.startswith(f"res{stage}.")}) for stage in range(2, 6)]
    bottleneck = any(k.endswith(".conv3.weight") for k in renamed)
    return DEPTHS.get((*blocks, bottleneck))


def convert_to_detectron2(src: str | os.PathLike, dst: str | os.PathLike,
                          model_name: str | None = None) -> tuple[dict, list[str]]:
    """Write ``dst`` (a ``.pkl`` in Detectron2's format) from timm ResNet weights in ``src``.

    Returns the payload written and the classifier keys left out (``fc.*`` of a classification checkpoint).

    ``src``: anything :func:`~downstream.convert.to_timm.read_timm_weights` reads. ``model_name``, if given,
    must match the architecture the source records.
    """
    if not str(dst).endswith(".pkl"):
        raise ConvertError(f"{dst}: Detectron2 reads converted weights from a .pkl file; name it *.pkl")
    weights = read_timm_weights(src, model_name)
    if model_name and weights.model_name and weights.model_name != model_name:
        raise ConvertError(f"{src} holds {weights.model_name} weights, expected {model_name}")
    renamed, dropped = rename_resnet(weights.state_dict, str(src))
    if resnet_depth(renamed) is None:
        raise ConvertError(f"{src}: {weights.model_name or 'the weights'} is not a standard ResNet-18/34/50/101/152 "
                           f"({len(renamed)} tensors)")
    payload = {"model": {k: v.detach().cpu().numpy() for k, v in renamed.items()}, "__author__": AUTHOR,
               "matching_heuristics": True}
    atomic_write(str(dst), lambda handle: pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL))
    return payload, dropped
