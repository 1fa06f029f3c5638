"""Optimiser and per-iteration schedules: timm's LAMB/AdamW/SGD, cosine lr with warm-up, cosine weight decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from .config import PretrainConfig

__all__ = ["NO_WEIGHT_DECAY", "Schedule", "build_optimizer", "build_schedule", "cosine"]

# Parameter names exempt from weight decay besides biases and all 1-d (norm, layer-scale) parameters:
# SparK's mask tokens and positional embeddings, and layer-scale gammas of any shape.
NO_WEIGHT_DECAY = ("*mask_token", "*pos_embed", "*gamma")


def _optimizer_kwargs(cfg: PretrainConfig) -> dict:
    """Optimiser-specific arguments; LAMB's own clipping is off because the engine clips (and logs) the norm."""
    if cfg.opt == "sgd":
        return {"momentum": cfg.momentum}
    kwargs: dict = {"betas": (cfg.beta1, cfg.beta2)}
    if cfg.opt == "lamb":
        kwargs["max_grad_norm"] = None
    return kwargs


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """timm optimiser ``cfg.opt`` over the trainable parameters of ``model`` at ``cfg.peak_lr``.

    Two parameter groups: weight decay ``cfg.weight_decay`` for weights, none for biases, 1-d parameters
    (norms, layer-scale gammas) and :data:`NO_WEIGHT_DECAY` names.
    """
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
                               **_optimizer_kwargs(cfg))


def cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1); ``progress`` is clamped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    """Per-iteration lr (timm cosine with linear warm-up) and weight-decay (cosine) schedules."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: CosineLRScheduler
    weight_decay: float
    weight_decay_end: float
    total_steps: int

    def apply(self, step: int) -> dict[str, float]:
        """Set the lr and weight decay of optimiser step ``step`` (0-based); returns ``{"lr", "weight_decay"}``."""
        self.lr_scheduler.step_update(step)
        wd = cosine(self.weight_decay, self.weight_decay_end, step / max(self.total_steps - 1, 1))
        for group in self.optimizer.param_groups:
            if group["initial_weight_decay"] > 0:
                group["weight_decay"] = wd
        return {"lr": self.optimizer.param_groups[0]["lr"], "weight_decay": wd if self.weight_decay > 0 else 0.0}


def build_schedule(optimizer: torch.optim.Optimizer, cfg: PretrainConfig, steps_per_epoch: int) -> Schedule:
    """Schedules over ``cfg.epochs x steps_per_epoch`` optimiser steps with ``cfg.warmup_epochs`` of warm-up."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    for group in optimizer.param_groups:
        group.setdefault("initial_weight_decay", group["weight_decay"])
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=cfg.peak_lr * cfg.min_lr_ratio,
        warmup_t=warmup,
        warmup_lr_init=cfg.peak_lr * cfg.warmup_lr_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return Schedule(optimizer, scheduler, cfg.weight_decay, cfg.weight_decay_end, total)
