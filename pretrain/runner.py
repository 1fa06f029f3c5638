"""One SparK pretraining run on this rank, built from the shared run machinery (:mod:`pretrain.runtime`).

A run starts from ``--init-weights`` where given (:mod:`pretrain.start_weights`). The run folder gets
``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-last.pth``, ``encoder_timm.pth`` and, when
training completes, ``result.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from .checkpoint import ENCODER, encoder_payload
from .config import PretrainConfig
from .data import build_pretrain_dataset, collate_skip_corrupt, demo_data_for_run
from .optim import build_optimizer
from .runtime.checkpoint import seed_everything
from .runtime.config import DEMO_DATA, run_record
from .runtime.distributed import DistEnv, freeze_unused_parameters, wrap_ddp
from .runtime.errors import RunError
from .runtime.io import join
from .runtime.loop import EpochData, TrainState
from .runtime.result import write_result
from .runtime.signals import StopRequest
from .runtime.stage import Outcome, find_resume_path, prepare_run
from .runtime.training import TrainingJob, train
from .spark import SparK, build_spark_from_config
from .start_weights import load_start_weights, start_weights
from .syncbn import sync_batchnorm
from .task import SparKTask

__all__ = ["ARCHITECTURE_KEYS", "RunError", "pretrain"]

logger = logging.getLogger("pretrain")
# Settings a resumed run must share with its checkpoint (the weights' and the optimiser state's shapes).
ARCHITECTURE_KEYS = ("model", "input_size", "patch_size", "decoder_width", "densify_norm", "masking",
                     "hierarchy", "ape", "opt")


def _data_path(cfg: PretrainConfig, env: DistEnv) -> str:
    if cfg.data != DEMO_DATA:
        return cfg.data
    root = demo_data_for_run(env.is_main)
    logger.info("--data %s (preset %s): training on the embedded demo set %s", DEMO_DATA, cfg.preset, root / "train")
    return str(root / "train")


def _build_model(cfg: PretrainConfig, env: DistEnv, channels_last: bool, weights: Any = None
                 ) -> tuple[SparK, list[str]]:
    """The SparK model on the device (same initial weights on every rank, ``weights`` loaded where given) and its
    frozen unused parameters."""
    seed_everything(cfg.seed)
    spark = build_spark_from_config(cfg.to_dict())
    if weights is not None:
        load_start_weights(spark, weights)
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
    precision = prepare_run(cfg, env.device)
    resume_from = find_resume_path(cfg.out, cfg.resume)
    start = start_weights(cfg, resume_from)
    cfg = start.cfg
    data = _data_path(cfg, env)
    dataset = build_pretrain_dataset(data, cfg.input_size, tuple(cfg.scale))
    spark, frozen = _build_model(cfg, env, precision.channels_last, start.weights)
    optimizer = build_optimizer(spark, cfg)
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    job = TrainingJob(
        SparKTask(wrap_ddp(spark, env), spark), optimizer,
        EpochData(dataset, sampler, cfg.batch_size, cfg.workers, cfg.seed, collate_skip_corrupt),
        {"model": spark, "optimizer": optimizer}, ARCHITECTURE_KEYS, "training checkpoint of python -m pretrain",
        extra=lambda state: {"frozen_parameters": frozen}, also_write=_write_encoder(cfg, spark),
        summary=f"{len(dataset)} images from {data}")
    record = run_record(cfg, precision=precision.to_dict())
    end = train(cfg, env, stop or StopRequest(), precision, job, record, resume_from)
    if end.stopped:
        return end.stopped
    state = end.state
    if env.is_main:
        inputs = {"data": data, "num_images": len(dataset), "resumed_from": resume_from,
                  "init_weights": cfg.init_weights or None}
        outputs = {"checkpoint": end.checkpoint, "encoder": join(cfg.out, ENCODER)}
        write_result(cfg.out, "pretrain", cfg.model, _metrics(state), record, inputs, outputs)
    return Outcome("completed", f"done: {state.epoch} epochs, {state.step} iterations; results in {cfg.out}", cfg.out)
