"""The lr and weight-decay schedules of every training stage: linear warm-up, then cosine (timm's scheduler).

``build_schedule(optimizer, cfg, steps_per_epoch)`` reads the schedule fields of a
:class:`pretrain.runtime.config.TrainingRunConfig` (``peak_lr``, ``warmup_epochs``, ``warmup_lr_ratio``,
``min_lr_ratio``, ``weight_decay`` -> ``weight_decay_end``, ``sched_on_updates``) and returns a
:class:`Schedule`: ``schedule(step)`` sets the lr of every parameter group (timm's ``CosineLRScheduler``, which also
applies each group's ``lr_scale`` of layer-wise decay) and the weight decay of the groups that decay, for optimiser
step ``step`` (0-based), and returns ``{"lr", "weight_decay"}`` to log. The clock is the optimiser step
(``sched_on_updates``, the default) or the epoch (MoCo v3's linear probe: the lr changes once per epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.scheduler import CosineLRScheduler

from .config import TrainingRunConfig

__all__ = ["Schedule", "build_schedule", "cosine"]


def cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1); ``progress`` is clamped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    """Warm-up + cosine lr and cosine weight decay over ``total`` ticks of ``steps_per_tick`` optimiser steps
    (1: per update; steps per epoch: per epoch)."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: CosineLRScheduler
    weight_decay: float
    weight_decay_end: float
    total: int
    steps_per_tick: int = 1

    def __call__(self, step: int) -> dict[str, float]:
        """Set the lr and weight decay of optimiser step ``step`` (0-based); returns ``{"lr", "weight_decay"}``
        (the largest group lr: the one without layer-wise decay)."""
        tick = step // self.steps_per_tick
        self.lr_scheduler.step_update(tick)
        wd = cosine(self.weight_decay, self.weight_decay_end, tick / max(self.total - 1, 1))
        if self.weight_decay_end != self.weight_decay:  # a constant decay leaves every group's own value alone
            for group in self.optimizer.param_groups:
                if group["initial_weight_decay"] > 0:
                    group["weight_decay"] = wd
        return {"lr": max(group["lr"] for group in self.optimizer.param_groups),
                "weight_decay": wd if self.weight_decay > 0 else 0.0}

    apply = __call__


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainingRunConfig, steps_per_epoch: int) -> Schedule:
    """The schedule of ``cfg`` over ``cfg.epochs x steps_per_epoch`` optimiser steps: linear warm-up over
    ``warmup_epochs`` from ``warmup_lr_ratio`` x peak, cosine to ``min_lr_ratio`` x peak; weight decay cosine from
    ``weight_decay`` to ``weight_decay_end`` (constant when None) for the groups that decay at all."""
    per_tick = steps_per_epoch if not cfg.sched_on_updates else 1
    total = cfg.epochs * steps_per_epoch // per_tick
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch / per_tick), total - 1)
    for group in optimizer.param_groups:
        group.setdefault("initial_weight_decay", group["weight_decay"])
    # Per update, the cosine reaches its floor at the last step, ``total - 1``, as the published SparK code's
    # ``lr_wd_annealing`` does in pretraining and fine-tuning (tests/test_parity_cls.py); per epoch it is MoCo v3's
    # ``0.5 (1 + cos(pi epoch / epochs))``, whose floor lies one epoch past the run.
    cosine_ticks = total - warmup - (1 if cfg.sched_on_updates else 0)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(cosine_ticks, 1), lr_min=cfg.peak_lr * cfg.min_lr_ratio, warmup_t=warmup,
        warmup_lr_init=cfg.peak_lr * cfg.warmup_lr_ratio, warmup_prefix=True, t_in_epochs=False,
    )
    end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    return Schedule(optimizer, scheduler, cfg.weight_decay, end, total, per_tick)
