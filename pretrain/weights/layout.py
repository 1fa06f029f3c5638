"""What a layout recognises in a file (:class:`Found`) and the registry entry that recognises it (:class:`Layout`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["NAMINGS", "Found", "Layout", "strip_prefix", "tensor_dict"]

# How the encoder keys a layout found are named: timm's own, the official ConvNeXt repository's (mapped with timm's
# ConvNeXt checkpoint filter), or Detectron2's ResNet names (mapped back by :mod:`.detectron2`).
NAMINGS = ("timm", "convnext-official", "detectron2-resnet")


@dataclass
class Found:
    """The parts of a file a layout recognised, before the architecture is settled.

    ``state_dict``: the encoder (and a trained classifier, if the file has one) in ``naming``; ``untrained``: its
    keys that hold no trained values (a fresh classifier written for timm's loaders); ``decoder``: SparK's
    decoder and densify layers under this suite's :class:`~pretrain.spark.SparK` names; ``spark``: the
    :func:`~pretrain.spark.build_spark` keyword arguments the file records; ``variants``: other state dicts of the
    same model (EMAs), in ``naming``; ``detectron2``: a Detectron2 checkpoint for ``DetectionCheckpointer``.
    """

    state_dict: dict[str, torch.Tensor]
    naming: str = "timm"
    model_name: str | None = None
    untrained: tuple[str, ...] = ()
    decoder: dict[str, torch.Tensor] | None = None
    spark: dict[str, Any] | None = None
    variants: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    detectron2: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """One file layout: ``name`` (logged, recorded), ``description`` (in messages and the README), a predicate on the
    loaded object and the function that takes it apart."""

    name: str
    description: str
    matches: Callable[[Any], bool]
    read: Callable[[Any], Found]


def tensor_dict(value: Any) -> bool:
    """A non-empty mapping of string keys to tensors (a state dict)."""
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` under ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
