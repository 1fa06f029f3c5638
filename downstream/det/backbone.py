"""A Detectron2 backbone around any timm convnet: its four stages (strides 4, 8, 16, 32) feed the FPN.

``MODEL.BACKBONE.NAME: build_timm_fpn_backbone`` with ``MODEL.TIMM.NAME`` (any timm model whose
``forward_intermediates`` returns four stage outputs at strides 4..32: resnet*, convnext*, regnet*,
efficientnet*...). The timm model sits under ``backbone.bottom_up.model`` with timm's own parameter names, so
SparK's ``encoder_timm.pth`` loads into it unchanged (:mod:`downstream.det.weights`); layers after the last
stage (ConvNeXt's ``head.norm``, EfficientNet's ``conv_head``) are pruned, so every parameter gets a gradient.

``MODEL.TIMM.STAGE_NORM: LN`` puts a LayerNorm on each stage output (``norm0``..``norm3`` beside ``model``), as
MMDetection's ConvNeXt backbone of the ConvNeXt repository does (``object_detection/mmdet/models/backbones/
convnext.py``: ``norm{i}`` applied to every output stage, initialised to weight 1, bias 0). They are new layers:
no pretrained file holds them (:attr:`TimmBackbone.fresh_keys`). ``MODEL.TIMM.LS_INIT_VALUE`` sets the layer-scale
init of ConvNeXt-style blocks (timm's ``ls_init_value``; that config uses 1.0), which only matters for weights a
file does not set.
"""

from __future__ import annotations

import logging

import timm
import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from timm.layers import LayerNorm2d, convert_sync_batchnorm, freeze_batch_norm_2d
from torch import nn

__all__ = ["STAGE_STRIDES", "TimmBackbone", "build_timm_fpn_backbone", "stage_prefixes"]

logger = logging.getLogger(__name__)
STAGE_STRIDES = (4, 8, 16, 32)
# MODEL.TIMM.NORM -> how the model's BatchNorms are converted ("" and "BN": left as they are).
NORM_CONVERSIONS = {"SyncBN": convert_sync_batchnorm, "FrozenBN": freeze_batch_norm_2d}
STAGE_NORMS = ("", "LN")  # MODEL.TIMM.STAGE_NORM: none, or a LayerNorm on each stage output (mmdet's norm0..3)
STAGE_NORM_EPS = 1e-6  # mmdet ConvNeXt: LayerNorm(eps=1e-6, data_format="channels_first")


class TimmBackbone(Backbone):
    """The four stride-4..32 stage outputs of a timm convnet, named ``out_features`` (``res2``..``res5``)."""

    def __init__(self, model_name: str, out_features: tuple[str, ...] = ("res2", "res3", "res4", "res5"),
                 in_chans: int = 3, drop_path_rate: float = 0.0, norm: str = "", stage_norm: str = "",
                 ls_init_value: float | None = None) -> None:
        super().__init__()
        if len(out_features) != len(STAGE_STRIDES):
            raise ValueError(f"MODEL.TIMM.OUT_FEATURES names the four stages; got {list(out_features)}")
        if stage_norm not in STAGE_NORMS:
            raise ValueError(f"MODEL.TIMM.STAGE_NORM must be one of {STAGE_NORMS}; got {stage_norm!r}")
        kwargs: dict = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        if ls_init_value is not None:
            kwargs["ls_init_value"] = ls_init_value
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        stages = [info for info in self.model.feature_info if info["reduction"] in STAGE_STRIDES]
        if [info["reduction"] for info in stages] != list(STAGE_STRIDES):
            raise ValueError(f"timm {model_name} has no four stages at strides 4, 8, 16, 32 "
                             f"(its feature reductions: {[i['reduction'] for i in self.model.feature_info]})")
        self._indices = [self.model.feature_info.index(info) for info in stages]
        self.pruned = self._prune()
        if norm in NORM_CONVERSIONS:
            self.model = NORM_CONVERSIONS[norm](self.model)
        elif norm not in ("", "BN"):
            logger.warning("MODEL.TIMM.NORM %s: timm's BatchNorms are kept unsynchronised", norm)
        self.stage_modules = tuple(info["module"] for info in stages)
        self._out_features = list(out_features)
        self._out_feature_strides = dict(zip(out_features, STAGE_STRIDES))
        self._out_feature_channels = {name: info["num_chs"] for name, info in zip(out_features, stages)}
        self.stage_norms = len(stages) if stage_norm else 0
        for index, info in enumerate(stages[:self.stage_norms]):
            self.add_module(f"norm{index}", LayerNorm2d(info["num_chs"], eps=STAGE_NORM_EPS))

    @property
    def fresh_keys(self) -> tuple[str, ...]:
        """State-dict keys (relative to this module) of layers no pretrained file holds: the stage norms."""
        return tuple(f"norm{i}.{p}" for i in range(self.stage_norms) for p in ("weight", "bias"))

    def _prune(self) -> tuple[str, ...]:
        """Drop the layers after the last stage; returns the state-dict keys that went with them."""
        before = set(self.model.state_dict())
        self.model.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
        return tuple(sorted(before - set(self.model.state_dict())))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(N, C, H, W)`` with H, W divisible by 32 -> ``{res2: (N, C2, H/4, W/4), ..., res5: (.., H/32, W/32)}``."""
        feats = self.model.forward_intermediates(x, indices=self._indices, intermediates_only=True)
        if self.stage_norms:
            feats = [getattr(self, f"norm{i}")(f) for i, f in enumerate(feats)]
        return dict(zip(self._out_features, feats))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return STAGE_STRIDES[-1]


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """FPN over :class:`TimmBackbone` (Detectron2 backbone factory: ``MODEL.BACKBONE.NAME``)."""
    timm_cfg = cfg.MODEL.TIMM
    bottom_up = TimmBackbone(timm_cfg.NAME, tuple(timm_cfg.OUT_FEATURES), input_shape.channels,
                             timm_cfg.DROP_PATH_RATE, timm_cfg.NORM, timm_cfg.STAGE_NORM, timm_cfg.LS_INIT_VALUE)
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def stage_prefixes(model: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """``(bottom-up prefix, four stage-module prefixes)`` of a Detectron2 model's backbone, or None.

    Used for layer-wise lr decay: Detectron2's ResNet (``stem``, ``res2``..``res5``) and :class:`TimmBackbone`
    (timm's stage modules, e.g. ``layer1``..``layer4`` or ``stages.0``..``stages.3``).
    """
    bottom_up = getattr(getattr(model, "backbone", None), "bottom_up", None)
    if isinstance(bottom_up, TimmBackbone):
        return "backbone.bottom_up.model.", bottom_up.stage_modules
    if bottom_up is not None and all(hasattr(bottom_up, name) for name in ("stem", "res2", "res3", "res4", "res5")):
        return "backbone.bottom_up.", ("res2", "res3", "res4", "res5")
    return None
