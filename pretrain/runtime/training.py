"""The runner skeleton of every epoch-based training stage (pretraining, fine-tuning): one place for what they share.

A stage builds its :class:`TrainingJob` (task, optimiser, data, what the checkpoint holds, its own hooks) and calls
:func:`train`, which does the rest the same way for every stage: the lr/wd schedule
(:func:`pretrain.runtime.schedule.build_schedule`), the checkpointer and the resume, ``config.json`` (the config
with the run's facts beside it, :func:`pretrain.runtime.config.run_record`), the run logs, the start line, the
hooks (metrics, the stage's step hooks, periodic saves, the stage's epoch hooks, epoch-end saves, in that order)
and :meth:`pretrain.runtime.loop.Trainer.run`. The stage then writes its ``result.json`` when the run completed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .checkpointer import Checkpointer, Stateful
from .config import TrainingRunConfig
from .distributed import DistEnv
from .errors import RunError
from .io import atomic_write_json, join
from .loop import EpochData, EpochSaveHook, Hook, LoopSettings, MetricsHook, PeriodicSaveHook, Task, Trainer, TrainState
from .precision import Precision
from .runlog import RunLogger
from .schedule import build_schedule
from .signals import StopRequest
from .stage import Outcome, stopped_outcome

__all__ = ["TrainingEnd", "TrainingJob", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingJob:
    """What a training stage brings to :func:`train`.

    ``saved``: the objects a checkpoint holds by name (model, optimizer, EMAs...); ``compat_keys``: the config
    entries a resumed run must share with its checkpoint; ``kind``: how errors name the checkpoint;
    ``step_hooks`` run after the metrics and before the periodic save (so a save holds their work: EMAs),
    ``epoch_hooks`` before the epoch-end save (so it holds theirs: evaluation); ``extra(state)`` /
    ``also_write(state, payload)``: the stage's checkpoint entries and companion files; ``summary``: the stage's
    part of the start line.
    """

    task: Task
    optimizer: torch.optim.Optimizer
    data: EpochData
    saved: Mapping[str, Stateful]
    compat_keys: Sequence[str]
    kind: str
    step_hooks: Sequence[Hook] = ()
    epoch_hooks: Sequence[Hook] = ()
    extra: Callable[[TrainState], Mapping[str, Any]] = lambda state: {}
    also_write: Callable[[TrainState, Mapping[str, Any]], None] = lambda state, payload: None
    summary: str = ""


@dataclass(frozen=True)
class TrainingEnd:
    """How :func:`train` ended: the final state, the checkpoint path, and the ``stopped`` outcome (None when every
    epoch ran)."""

    state: TrainState
    checkpoint: str
    stopped: Outcome | None


def train(cfg: TrainingRunConfig, env: DistEnv, stop: StopRequest, precision: Precision, job: TrainingJob,
          record: Mapping[str, Any], resume_from: str | None) -> TrainingEnd:
    """Run ``job`` as ``cfg`` says on this rank, resuming from ``resume_from`` (a checkpoint path or None).

    ``record`` is what ``config.json`` and the checkpoints store (the config and the run's facts). Raises
    :class:`RunError` for an epoch without a single optimiser step or a non-finite loss, and the checkpointer's
    errors for a checkpoint that cannot be resumed.
    """
    per_epoch = len(job.data.sampler) // cfg.batch_size // cfg.grad_accum_steps
    if per_epoch == 0:
        raise RunError(f"{len(job.data.sampler)} training images per rank are fewer than one optimiser step "
                       f"({cfg.batch_size} x {cfg.grad_accum_steps} accumulation on {env.world_size} rank(s))")
    checkpointer = Checkpointer(cfg.out, env, job.saved, record, per_epoch, cfg.epochs * per_epoch, job.compat_keys,
                                job.kind, extra=job.extra, also_write=job.also_write)
    state, rng = checkpointer.load(resume_from) if resume_from else (TrainState(), None)
    if env.is_main:
        atomic_write_json(join(cfg.out, "config.json"), dict(record))
    run_logger = RunLogger(cfg.out, env.is_main, cfg.tensorboard, cfg.progress, resume_step=state.step)
    logger.info("%s on %d rank(s) (%s): %d steps/epoch, %s%s", cfg.model, env.world_size, env.device, per_epoch,
                cfg.describe_batch(), f"; {job.summary}" if job.summary else "")
    settings = LoopSettings(cfg.epochs, per_epoch, cfg.grad_accum_steps, cfg.clip_grad, cfg.seed)
    trainer = Trainer(job.task, job.optimizer, build_schedule(job.optimizer, cfg, per_epoch), settings, env, precision,
                      run_logger, stop, checkpointer, job.data, state)
    trainer.register_hooks([MetricsHook(cfg.log_every), *job.step_hooks, PeriodicSaveHook(cfg.save_every),
                            *job.epoch_hooks, EpochSaveHook(cfg.snapshot_every)])
    try:
        completed = trainer.run(rng)
    finally:
        run_logger.close()
    stopped = None if completed else stopped_outcome(
        cfg.out, stop.signal_name, f"at epoch {state.epoch + 1}, iteration {state.step}")
    return TrainingEnd(state, checkpointer.path, stopped)
