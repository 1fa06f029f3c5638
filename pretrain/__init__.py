"""SparK pretraining: sparse encoder for any timm convnet, light decoder, masked-patch objective.

The model classes are imported on first use, so ``import pretrain.runtime.config`` (the sweep, the result
tables) does not import torch or timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LightDecoder", "SparK", "SparseEncoder", "build_spark"]

_HOMES = {"LightDecoder": ".decoder", "SparseEncoder": ".encoder", "SparK": ".spark", "build_spark": ".spark"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
