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
from collections.abc import Mapping
from typing import Any

import torch

from pretrain.runtime.io import atomic_write
from pretrain.weights import read_weights
from pretrain.weights.detectron2 import RESNET_RULES, resnet_depth, timm_resnet_to_detectron2

from .to_timm import ConvertError, key_examples

__all__ = ["AUTHOR", "CLASSIFIER_PREFIX", "RESNET_RULES", "convert_to_detectron2", "rename_resnet", "resnet_depth"]

AUTHOR = "SparK suite (python -m downstream.convert detectron2)"
CLASSIFIER_PREFIX = "fc."


def rename_resnet(state: Mapping[str, torch.Tensor], source: str = "weights") -> tuple[dict[str, Any], list[str]]:
    """``(Detectron2-named state, dropped classifier keys)``; :class:`ConvertError` naming unmappable keys."""
    renamed, unmapped = timm_resnet_to_detectron2(state)
    dropped = [k for k in unmapped if k.startswith(CLASSIFIER_PREFIX)]
    unknown = [k for k in unmapped if not k.startswith(CLASSIFIER_PREFIX)]
    if unknown:
        raise ConvertError(f"{source}: {len(unknown)} keys have no Detectron2 ResNet name ({key_examples(unknown)}); "
                           "only timm ResNets (resnet18..152) convert, other convnets use the timm backbone")
    return renamed, dropped


def convert_to_detectron2(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
                          trust: bool = False) -> tuple[dict, list[str]]:
    """Write ``dst`` (a ``.pkl`` in Detectron2's format) from timm ResNet weights in ``src``.

    Returns the payload written and the classifier keys left out (``fc.*`` of a classification checkpoint).

    ``src``: any layout :func:`pretrain.weights.read_weights` reads. ``model_name``, if given, must match the
    architecture the source records.
    """
    if not str(dst).endswith(".pkl"):
        raise ConvertError(f"{dst}: Detectron2 reads converted weights from a .pkl file; name it *.pkl")
    weights = read_weights(src, model_name, trust=trust)
    renamed, dropped = rename_resnet(weights.state_dict, str(src))
    if resnet_depth(renamed) is None:
        raise ConvertError(f"{src}: {weights.model_name or 'the weights'} is not a standard ResNet-18/34/50/101/152 "
                           f"({len(renamed)} tensors)")
    payload = {"model": {k: v.detach().cpu().numpy() for k, v in renamed.items()}, "__author__": AUTHOR,
               "matching_heuristics": True}
    atomic_write(str(dst), lambda handle: pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL))
    return payload, dropped
