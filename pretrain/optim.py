"""The pretraining optimiser: timm's LAMB/AdamW/SGD over SparK's parameter groups.

The lr / weight-decay schedule is the one every training stage shares, :func:`pretrain.runtime.schedule.build_schedule`
(re-exported here with :class:`~pretrain.runtime.schedule.Schedule` and :func:`~pretrain.runtime.schedule.cosine`).
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn

from .config import PretrainConfig
from .runtime.schedule import Schedule, build_schedule, cosine

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
