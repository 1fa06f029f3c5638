"""Classification as a task of the shared loop (:mod:`pretrain.runtime.loop`): timm's Mixup/CutMix and loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from .config import ClsConfig

__all__ = ["ClsTask", "build_criterion", "build_mixup"]


def build_mixup(cfg: ClsConfig, num_classes: int) -> Mixup | None:
    """timm's ``Mixup`` (mixup and/or cutmix, label smoothing inside the mixed targets), or None when both are off.

    Linear probing never mixes (its recipe sets both alphas to 0)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def build_criterion(cfg: ClsConfig, mixing: bool) -> nn.Module:
    """The training loss, chosen as timm's ``train.py`` does: with mixed (soft) targets BCE or soft-target
    cross-entropy (the smoothing is already in the targets); with class indices BCE or cross-entropy, smoothed."""
    if cfg.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixing else cfg.smoothing, target_threshold=cfg.bce_target_thresh)
    if mixing:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()


@dataclass
class ClsTask:
    """``loss(images, labels, generator)``: mix the batch (timm draws from NumPy's global generator, which the
    checkpoints save and restore), classify, and score against the (mixed) targets."""

    model: nn.Module  # the classifier, DDP-wrapped when several ranks run
    criterion: nn.Module
    mixup: Mixup | None = None

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        targets: torch.Tensor = labels
        if self.mixup is not None:
            if images.shape[0] % 2 and images.shape[0] > 1:  # timm mixes pairs: an odd batch (unreadable images
                images, labels = images[:-1], labels[:-1]  # dropped) loses one image
            if images.shape[0] > 1:
                images, targets = self.mixup(images, labels)
            else:
                targets = mixup_target(labels, self.mixup.num_classes, smoothing=self.mixup.label_smoothing)
        return self.criterion(self.model(images), targets)
