"""Converters of pretrained weights for the downstream stages (``python -m downstream.convert {timm,detectron2,hf}``).

Every source is read by :func:`pretrain.weights.read_weights` (any layout it knows).

- :mod:`.to_timm`: -> a checked timm file (the ``encoder_timm.pth`` format), and :func:`load_timm_weights` to load
  weights into a timm classifier with a report of the missing head;
- :mod:`.to_detectron2`: timm ResNet weights -> Detectron2's pickle format;
- ``hf``: a Hugging Face Hub folder for timm (:func:`pretrain.weights.write_hub_folder`).

Names are imported on first use, so importing this package imports neither torch nor timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ConvertError", "LoadReport", "convert_to_detectron2", "convert_to_timm", "load_timm_weights",
           "read_timm_weights"]

_HOMES = {"ConvertError": ".to_timm", "LoadReport": ".to_timm", "convert_to_timm": ".to_timm",
          "load_timm_weights": ".to_timm", "read_timm_weights": ".to_timm", "convert_to_detectron2": ".to_detectron2"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
