"""Weights in and out: one reader for every file a stage takes, and the files timm reads.

- :func:`read_weights` (:mod:`.reader`): read a file once without running its code (:mod:`.files`), identify its
  layout from :data:`LAYOUTS` (this suite's files :mod:`.suite`, timm's :mod:`.timm_layouts`, the released SparK
  files :mod:`.released`, Detectron2's :mod:`.detectron2`), settle and check the architecture
  (:mod:`.architectures`), and return :class:`Weights`;
- :func:`build_spark_model` / :func:`load_spark_weights` (:mod:`.spark_model`): weights into this suite's SparK;
- :func:`timm_file_payload` / :func:`write_hub_folder` (:mod:`.export`): ``encoder_timm.pth`` and a Hugging Face
  Hub folder for timm.

Names are imported on first use, so ``from pretrain.weights import TRUST_FLAG`` (a command line's ``--help``)
imports neither torch nor timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LAYOUTS", "SUITE_ARCHITECTURES", "TRUST_FLAG", "ArchitectureMismatch", "Weights", "WeightsError",
           "build_spark_model", "load_spark_weights", "read_weights", "timm_file_payload", "write_hub_folder"]

TRUST_FLAG = "--trust-weights"  # the flag of every entry point that unpickles a file fully (it can run its code)

_HOMES = {"LAYOUTS": ".reader", "Weights": ".reader", "read_weights": ".reader",
          "SUITE_ARCHITECTURES": ".architectures", "ArchitectureMismatch": ".files", "WeightsError": ".files",
          "build_spark_model": ".spark_model", "load_spark_weights": ".spark_model",
          "timm_file_payload": ".export", "write_hub_folder": ".export"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
