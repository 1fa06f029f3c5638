"""Detectron2 configs of the suite: the extra keys, the shipped YAML files, and their adaptation to a run.

Shipped configs live in ``downstream/det/configs/`` and are named by file stem (``mask_rcnn_R_50_FPN_1x``,
``tiny``...) or given as a path. Keys added to Detectron2's defaults:

- ``MODEL.TIMM.NAME`` / ``DROP_PATH_RATE`` / ``OUT_FEATURES`` / ``NORM``: the timm backbone
  (:mod:`downstream.det.backbone`); ``NORM`` "" keeps the model's norms, "SyncBN" / "BN" / "FrozenBN" convert
  its BatchNorms; ``STAGE_NORM`` "LN" adds a LayerNorm on each stage output (MMDetection's ConvNeXt ``norm0..3``);
  ``LS_INIT_VALUE`` the layer-scale init (timm's ``ls_init_value``; None: the model's default);
- ``INPUT.CROP_BRANCH``: the second branch of the DETR-style training augmentation of the published ConvNeXt
  detection config (``ENABLED``, ``PROB``, ``MIN_SIZE``, ``TYPE``, ``SIZE``; :mod:`downstream.det.augment`);
- ``SOLVER.OPTIMIZER`` ("ADAMW" or Detectron2's "SGD"), ``SOLVER.BETAS`` (AdamW), ``SOLVER.LAYER_DECAY``
  (1.0: off), ``SOLVER.WEIGHT_DECAY_EXEMPT`` ("1d" or "norm": which parameters AdamW leaves undecayed; see
  :mod:`downstream.det.optim`).

Precision and memory layout are not Detectron2 keys: they are the stage's ``--amp`` / ``--channels-last`` (the
suite's :class:`pretrain.runtime.config.RunConfig`, one rule for every stage). The file names and the torch-free
reading live in :mod:`downstream.det.config_files`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detectron2.config import CfgNode, get_cfg

from pretrain.runtime.errors import UsageError

from .config_files import CONFIG_DIR, adapt_norms, config_path, shipped_configs

__all__ = ["CONFIG_DIR", "adapt_to_run", "add_spark_config", "config_path", "from_resolved", "load_config",
           "shipped_configs"]

logger = logging.getLogger(__name__)


def add_spark_config(cfg: CfgNode) -> CfgNode:
    """Add the suite's keys (module docstring) to ``cfg`` with their neutral defaults; returns ``cfg``."""
    cfg.MODEL.TIMM = CfgNode()
    cfg.MODEL.TIMM.NAME = "resnet50"
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.TIMM.NORM = ""
    cfg.MODEL.TIMM.STAGE_NORM = ""
    cfg.MODEL.TIMM.LS_INIT_VALUE = None
    cfg.INPUT.CROP_BRANCH = CfgNode()
    cfg.INPUT.CROP_BRANCH.ENABLED = False
    cfg.INPUT.CROP_BRANCH.PROB = 0.5
    cfg.INPUT.CROP_BRANCH.MIN_SIZE = (400, 500, 600)
    cfg.INPUT.CROP_BRANCH.TYPE = "absolute_range"
    cfg.INPUT.CROP_BRANCH.SIZE = [384, 600]
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.LAYER_DECAY = 1.0
    cfg.SOLVER.WEIGHT_DECAY_EXEMPT = "1d"
    return cfg


def load_config(config: str | Path, overrides: Sequence[str] = ()) -> CfgNode:
    """Detectron2's defaults + the suite's keys + ``config`` + ``KEY VALUE`` ``overrides`` (not frozen).

    Unknown keys, malformed values or an odd number of override items raise :class:`UsageError` (one line).
    """
    cfg = add_spark_config(get_cfg())
    path = config_path(config)
    try:
        cfg.merge_from_file(str(path))
    except (KeyError, ValueError, TypeError, AssertionError, OSError) as error:
        hint = (" (SOLVER.PRECISION is gone: precision is the stage's --amp / --channels-last)"
                if "PRECISION" in str(error) else "")
        raise UsageError(f"cannot load config {path}: {error}{hint}") from error
    if len(overrides) % 2:
        raise UsageError(f"config overrides come as KEY VALUE pairs; got {len(overrides)} items: {list(overrides)}")
    try:
        cfg.merge_from_list(list(overrides))
    except (KeyError, ValueError, TypeError, AssertionError) as error:
        hint = " (precision is the stage's --amp / --channels-last)" if "PRECISION" in str(error) else ""
        raise UsageError(f"bad config override: {error}{hint}") from error
    return cfg


def from_resolved(values: Mapping[str, Any]) -> CfgNode:
    """The frozen Detectron2 config of a resolved run (``DetConfig.detectron2``, the dump of :func:`load_config`
    after :func:`adapt_to_run`)."""
    cfg = add_spark_config(get_cfg())
    cfg.merge_from_other_cfg(CfgNode(dict(values)))
    cfg.freeze()
    return cfg


def adapt_to_run(cfg: CfgNode, world_size: int, device: str) -> list[str]:
    """Make ``cfg`` (not frozen) runnable on ``world_size`` ranks of ``device``; returns one note per change.

    ``MODEL.DEVICE`` becomes ``device``; synchronised BatchNorm follows :func:`~.config_files.adapt_norms`.
    """
    notes = []
    if device != cfg.MODEL.DEVICE:
        notes.append(f"MODEL.DEVICE {cfg.MODEL.DEVICE} -> {device}")
        cfg.MODEL.DEVICE = device
    return notes + adapt_norms(cfg, world_size, device)
