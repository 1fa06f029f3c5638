"""Layer-wise lr decay with the published SparK code's layer layout, for timm ResNets and ConvNeXts.

timm's own layer decay (``create_optimizer_v2(..., layer_decay=...)``) puts every block in its own layer
(ResNet-50: 18 layers). The published SparK fine-tuning code (``downstream_imagenet/models/__init__.py``) groups
coarser, and :func:`published_param_groups` reproduces that on timm's parameter names:

- ResNets: the stem is layer 0, ``layer1`` layer 1, ``layer2`` and ``layer3`` are cut into chunks of consecutive
  blocks (chunk sizes per depth in :data:`RESNET_CHUNKS`; ResNet-50: two halves each), ``layer4`` comes next and
  the classifier last. ResNet-50 thus has 8 layers, stem to ``fc``.
- ConvNeXts: the stem is layer 0, stage 0 layer 1, stage 1 (with its downsampling) layer 2, stage 2 in chunks of
  three blocks from layer 3 (its downsampling with the first chunk), stage 3 (and its downsampling) layer ``N``
  with ``N = 12`` when stage 2 has more than 9 blocks (small, base, large) else 6; the head is layer ``N + 1``.

Layer ``i`` of ``L`` gets ``lr_scale = decay ** (L - 1 - i)`` (the classifier trains at the full rate; timm's
scheduler multiplies each group's lr by its ``lr_scale``). Weight decay skips 1-D parameters (biases, norms) as
both the published code and timm do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from torch import nn

from pretrain.runtime.config import ConfigError

__all__ = ["RESNET_CHUNKS", "convnext_layer_ids", "published_layer_ids", "published_param_groups",
           "resnet_layer_ids"]

# Blocks per chunk of (layer2, layer3), by their block counts, as the published code sets them. Other depths
# (e.g. ResNet-18/34) cut both stages in two halves, which is what the table does for ResNet-50.
RESNET_CHUNKS: Mapping[tuple[int, int], tuple[int, int]] = MappingProxyType({
    (4, 6): (2, 3),  # ResNet-50
    (4, 23): (2, 3),  # ResNet-101
    (8, 36): (4, 4),  # ResNet-152
    (24, 36): (4, 4),  # ResNet-200
    (30, 48): (5, 6),  # ECA-ResNet-269d
})


def resnet_layer_ids(model: ResNet) -> tuple[Callable[[str], int], int]:
    """``(layer of a parameter name, number of layers)`` for a timm ResNet, in the published layout."""
    blocks2, blocks3 = len(model.layer2), len(model.layer3)
    chunk2, chunk3 = RESNET_CHUNKS.get((blocks2, blocks3), (math.ceil(blocks2 / 2), math.ceil(blocks3 / 2)))
    groups2, groups3 = math.ceil(blocks2 / chunk2), math.ceil(blocks3 / chunk3)
    last_stage = 2 + groups2 + groups3  # layer of layer4; the classifier follows

    def layer(name: str) -> int:
        head, _, rest = name.partition(".")
        if head == "fc":
            return last_stage + 1
        if not head.startswith("layer"):
            return 0  # the stem
        stage, block = int(head[len("layer"):]), int(rest.split(".")[0])
        first = {1: 1, 2: 2, 3: 2 + groups2, 4: last_stage}[stage]
        chunk = {2: chunk2, 3: chunk3}.get(stage)
        return first + block // chunk if chunk else first

    return layer, last_stage + 2


def convnext_layer_ids(model: ConvNeXt) -> tuple[Callable[[str], int], int]:
    """``(layer of a parameter name, number of layers)`` for a timm ConvNeXt, in the published layout."""
    last_stage = 12 if len(model.stages[2].blocks) > 9 else 6

    def layer(name: str) -> int:
        parts = name.split(".")
        if parts[0] == "stem":
            return 0
        if parts[0] != "stages":
            return last_stage + 1  # norm_pre, head.norm, head.fc
        stage = int(parts[1])
        if stage == 3:
            return last_stage
        if stage < 2:
            return stage + 1
        return 3 + int(parts[3]) // 3 if parts[2] == "blocks" else 3  # stage 2: chunks of 3 blocks

    return layer, last_stage + 2


# The families the published code defines a layout for, by timm model class.
LAYOUTS: Mapping[type, Callable[[Any], tuple[Callable[[str], int], int]]] = MappingProxyType({
    ResNet: resnet_layer_ids,
    ConvNeXt: convnext_layer_ids,
})


def published_layer_ids(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """The published layout of ``model``; :class:`ConfigError` for families it has none for."""
    for cls, layout in LAYOUTS.items():
        if isinstance(model, cls):
            return layout(model)
    raise ConfigError(f"the published layer-decay layout covers ResNets and ConvNeXts, not {type(model).__name__}; "
                      "use --layer-decay-groups timm")


def published_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups (``params``, ``weight_decay``, ``lr_scale``) of the trainable parameters,
    one per (layer, decay or not), for ``timm.optim.create_optimizer_v2(groups, ...)``."""
    layer_of, num_layers = published_layer_ids(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decay = layer_of(name), param.ndim > 1
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers - 1 - layer), "layer": layer,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]
