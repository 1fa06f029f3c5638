"""One SparK pretraining run on this rank, built from the shared run machinery (:mod:`pretrain.runtime`).

The run folder gets ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-last.pth``,
``encoder_timm.pth`` and, when training completes, ``result.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from .checkpoint import ENCODER, encoder_payload
from .config import PretrainConfig
from .data import DataError, build_pretrain_dataset, collate_skip_corrupt, ensure_demo_data
from .optim import build_optimizer, build_schedule
from .runtime.checkpoint import CHECKPOINT, restore_rng
from .runtime.checkpointer import Checkpointer
from .runtime.distributed import DistEnv, barrier, freeze_unused_parameters, wrap_ddp
from .runtime.errors import SuiteError
from .runtime.io import atomic_write_json, join
from .runtime.loop import (
    EpochSaveHook,
    LoopSettings,
    MetricsHook,
    NonFiniteError,
    PeriodicSaveHook,
    Trainer,
    TrainState,
    derive_seed,
    epoch_loader,
)
from .runtime.result import write_result
from .runtime.runlog import RunLogger
from .runtime.signals import StopRequest, parse_signals
from .runtime.stage import Outcome, find_resume_path, prepare_run, seed_everything
from .spark import SparK, build_spark_from_config
from .syncbn import sync_batchnorm
from .task import SparKTask

__all__ = ["ARCHITECTURE_KEYS", "RunError", "pretrain", "steps_per_epoch"]

logger = logging.getLogger("pretrain")
# Settings a resumed run must share with its checkpoint (the weights' and the optimiser state's shapes).
ARCHITECTURE_KEYS = ("model", "input_size", "patch_size", "decoder_width", "densify_norm", "masking",
                     "hierarchy", "ape", "opt")


class RunError(SuiteError, RuntimeError):
    """A run that cannot continue (non-finite loss, empty epoch)."""


def steps_per_epoch(num_images: int, cfg: PretrainConfig) -> int:
    """Optimiser steps per epoch: each rank's share of whole batches, grouped by ``grad_accum_steps``."""
    return num_images // cfg.world_size // cfg.batch_size // cfg.grad_accum_steps


def _data_path(cfg: PretrainConfig, env: DistEnv) -> str:
    if cfg.data:
        return cfg.data
    if env.is_main:  # draw the demo set once, before the other ranks look for it
        ensure_demo_data()
    barrier()
    root = ensure_demo_data()
    logger.info("no --data given: using the embedded demo set %s", root / "train")
    return str(root / "train")


def _build_model(cfg: PretrainConfig, env: DistEnv, channels_last: bool) -> tuple[SparK, list[str]]:
    """The SparK model on the device (same initial weights on every rank) and its frozen unused parameters."""
    seed_everything(cfg.seed)
    spark = build_spark_from_config(cfg.to_dict())
    spark.to(env.device).train()
    if channels_last:
        spark.to(memory_format=torch.channels_last)
    probe = torch.randn(2, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(cfg.seed))
    frozen = freeze_unused_parameters(spark, probe.to(env.device))
    if frozen:
        logger.info("parameters the loss never reaches (left untrained and out of DDP): %s", ", ".join(frozen))
    if env.distributed:
        replaced = sync_batchnorm(spark)
        logger.info("%d decoder BatchNorm layers synchronised over %d ranks", replaced, env.world_size)
    return spark, frozen


def _write_encoder(cfg: PretrainConfig, spark: SparK) -> Any:
    """``also_write`` of the checkpointer: ``encoder_timm.pth`` beside every checkpoint."""
    from .runtime.checkpoint import save_torch

    def write(state: TrainState, payload: Mapping[str, Any]) -> None:
        meta = {"epoch": state.epoch, "iteration": state.step, "config": payload["config"], "method": "SparK"}
        save_torch(join(cfg.out, ENCODER), encoder_payload(spark.encoder_state_dict(), spark.encoder.model_name, meta))

    return write


def _metrics(state: TrainState) -> dict[str, Any]:
    losses = state.epoch_losses
    return {
        "loss_first_epoch": losses[0] if losses else None, "loss_last_epoch": losses[-1] if losses else None,
        "epoch_losses": losses, "epochs": state.epoch, "iterations": state.step, "images_seen": state.images_seen,
        "skipped_images": state.skipped_images, "train_time_s": state.train_seconds,
        "images_per_s": state.images_seen / max(state.train_seconds, 1e-9),
    }


def pretrain(cfg: PretrainConfig, env: DistEnv, stop: StopRequest | None = None) -> Outcome:
    """Pretrain as ``cfg`` says on this rank; resumes, checkpoints, logs, and writes ``result.json`` at the end.

    Raises :class:`pretrain.runtime.config.ConfigError`, :class:`pretrain.data.DataError`,
    :class:`pretrain.runtime.checkpoint.CheckpointError` or :class:`RunError` with a one-line message.
    """
    stop = stop or StopRequest()
    precision = prepare_run(cfg, env.device)
    resume_from = find_resume_path(cfg.out, cfg.resume)
    data = _data_path(cfg, env)
    dataset = build_pretrain_dataset(data, cfg.input_size, tuple(cfg.crop_scale))
    per_epoch = steps_per_epoch(len(dataset), cfg)
    if per_epoch == 0:
        raise DataError(f"{data}: {len(dataset)} images are fewer than one global batch of {cfg.global_batch}")
    spark, frozen = _build_model(cfg, env, precision.channels_last)
    optimizer = build_optimizer(spark, cfg)
    schedule = build_schedule(optimizer, cfg, per_epoch)
    checkpointer = Checkpointer(
        cfg.out, env, {"model": spark, "optimizer": optimizer}, cfg.to_dict(), per_epoch, cfg.epochs * per_epoch,
        ARCHITECTURE_KEYS, "training checkpoint of python -m pretrain",
        extra=lambda state: {"frozen_parameters": frozen}, also_write=_write_encoder(cfg, spark))
    state, rng = checkpointer.load(resume_from) if resume_from else (TrainState(), None)
    if env.is_main:
        atomic_write_json(join(cfg.out, "config.json"), cfg.to_dict())
    run_logger = RunLogger(cfg.out, env.is_main, cfg.tensorboard, cfg.progress, resume_step=state.step)
    logger.info("%s on %d rank(s) (%s): %d images, %d steps/epoch, global batch %d = %d x %d ranks x %d accum, "
                "peak lr %.3g", cfg.model, env.world_size, env.device, len(dataset), per_epoch, cfg.global_batch,
                cfg.batch_size, env.world_size, cfg.grad_accum_steps, cfg.peak_lr)
    settings = LoopSettings(cfg.epochs, per_epoch, cfg.grad_accum_steps, cfg.clip_grad, cfg.seed)
    hooks = [MetricsHook(cfg.log_every), PeriodicSaveHook(cfg.save_every), EpochSaveHook(cfg.snapshot_every)]
    trainer = Trainer(SparKTask(wrap_ddp(spark, env), spark), optimizer, schedule.apply, settings, env, precision,
                      run_logger, stop, checkpointer.save, state, hooks)
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    try:
        with stop.installed(parse_signals(cfg.stop_signals)):
            if rng is not None:
                restore_rng(rng)
            else:  # a fresh run, or another world size than the checkpoint's
                seed_everything(derive_seed(cfg.seed, state.step, env.rank))
            for hook in hooks:
                hook.before_train(trainer)
            for epoch in range(state.epoch, cfg.epochs):
                skip = state.step_in_epoch * cfg.grad_accum_steps
                loader = epoch_loader(dataset, sampler, cfg.batch_size, epoch, skip, cfg.workers, cfg.seed, env,
                                      collate_skip_corrupt)
                if trainer.train_epoch(loader):
                    message = (f"stopped by {stop.signal_name} at epoch {state.epoch + 1}, iteration {state.step}: "
                               f"saved {join(cfg.out, CHECKPOINT)}; run again with --resume auto to continue")
                    return Outcome("stopped", message, cfg.out, stop.signal_name)
                loss = trainer.end_epoch()
                logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, cfg.epochs, loss)
    except NonFiniteError as error:
        kept = (f"the last good checkpoint is {checkpointer.path} (iteration {checkpointer.saved_step})"
                if checkpointer.saved_step is not None else "no checkpoint had been saved yet")
        raise RunError(f"{error} (epoch {state.epoch + 1}); stopped without saving: {kept}") from error
    finally:
        run_logger.close()
    if env.is_main:
        inputs = {"data": data, "num_images": len(dataset), "resumed_from": resume_from}
        outputs = {"checkpoint": checkpointer.path, "encoder": join(cfg.out, ENCODER)}
        write_result(cfg.out, "pretrain", cfg.model, _metrics(state), cfg.to_dict(), inputs, outputs)
    return Outcome("completed", f"done: {state.epoch} epochs, {state.step} iterations; results in {cfg.out}", cfg.out)
