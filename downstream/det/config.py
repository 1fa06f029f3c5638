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
  :mod:`downstream.det.optim`);
- ``SOLVER.PRECISION.AMP`` (auto / bf16 / none) and ``SOLVER.PRECISION.CHANNELS_LAST`` (auto / on / off): the
  hardware rule of :mod:`pretrain.runtime.precision`; a run stores what it chose ("auto" resolved).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from detectron2.config import CfgNode, get_cfg

from pretrain.runtime.errors import UsageError

__all__ = ["CONFIG_DIR", "adapt_to_run", "add_spark_config", "config_path", "load_config", "shipped_configs"]

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SYNC_NORMS = ("SyncBN", "naiveSyncBN")
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM",
             "MODEL.TIMM.NORM")


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
    cfg.SOLVER.PRECISION = CfgNode()
    cfg.SOLVER.PRECISION.AMP = "auto"
    cfg.SOLVER.PRECISION.CHANNELS_LAST = "auto"
    return cfg


def shipped_configs() -> list[str]:
    """Names of the shipped configs (file stems; the ``Base-*`` files are only bases)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("Base-"))


def config_path(config: str | Path) -> Path:
    """The YAML file of a shipped config name or a path; :class:`UsageError` listing the names if neither."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = CONFIG_DIR / f"{config}.yaml"
    if shipped.is_file():
        return shipped
    raise UsageError(f"unknown config {str(config)!r}: not a file, nor one of {', '.join(shipped_configs())}")


def load_config(config: str | Path, overrides: Sequence[str] = ()) -> CfgNode:
    """Detectron2's defaults + the suite's keys + ``config`` + ``KEY VALUE`` ``overrides`` (not frozen).

    Unknown keys, malformed values or an odd number of override items raise :class:`UsageError` (one line).
    """
    cfg = add_spark_config(get_cfg())
    path = config_path(config)
    try:
        cfg.merge_from_file(str(path))
    except (KeyError, ValueError, TypeError, AssertionError, OSError) as error:
        raise UsageError(f"cannot load config {path}: {error}") from error
    if len(overrides) % 2:
        raise UsageError(f"config overrides come as KEY VALUE pairs; got {len(overrides)} items: {list(overrides)}")
    try:
        cfg.merge_from_list(list(overrides))
    except (KeyError, ValueError, TypeError, AssertionError) as error:
        raise UsageError(f"bad config override: {error}") from error
    return cfg


def adapt_to_run(cfg: CfgNode, world_size: int, device: str) -> list[str]:
    """Make ``cfg`` (not frozen) runnable here; returns one note per change.

    ``MODEL.DEVICE`` becomes ``device``. Synchronised BatchNorm needs several processes: on one process every
    SyncBN becomes BN (same statistics, no process group); on several CPU processes ``SyncBN`` (CUDA only in
    torch) becomes Detectron2's ``naiveSyncBN`` (all-reduce through the gloo group).
    """
    notes = []
    if device != cfg.MODEL.DEVICE:
        notes.append(f"MODEL.DEVICE {cfg.MODEL.DEVICE} -> {device}")
        cfg.MODEL.DEVICE = device
    for key in NORM_KEYS:
        node, leaf = cfg, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        value = node[leaf[-1]]
        new = value
        if value in SYNC_NORMS and world_size == 1:
            new = "BN"
        elif value == "SyncBN" and device == "cpu":
            new = "naiveSyncBN"
        if new != value:
            node[leaf[-1]] = new
            notes.append(f"{key} {value} -> {new} ({world_size} process{'es' if world_size > 1 else ''} on {device})")
    return notes
