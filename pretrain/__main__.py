"""SparK pretraining runner: ``python -m pretrain --model resnet50 --data DIR --out runs/r50 [--preset paper|tiny]``.

Single process, ``torchrun --nproc_per_node N -m pretrain ...``, or one task per GPU inside a SLURM step.
The run folder gets ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-last.pth``,
``encoder_timm.pth`` and, when training completes, ``result.json``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from iopath.common.file_io import PathManager

from .checkpoint import ENCODER, encoder_payload
from .config import ConfigError, PretrainConfig, add_config_arguments, resolve_config
from .data import DataError, build_pretrain_dataset, ensure_demo_data
from .distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    freeze_unused_parameters,
    init_distributed,
    shutdown_distributed,
    sync_batchnorm,
    world_size_from_environment,
    wrap_ddp,
)
from .engine import Engine, NonFiniteError, TrainState, derive_seed, epoch_loader, steps_per_epoch
from .logging_utils import RunLogger, setup_logging
from .optim import build_optimizer, build_schedule
from .runtime.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    capture_rng,
    find_checkpoint,
    load_torch,
    restore_rng,
    save_torch,
)
from .runtime.cli import ArgumentParser
from .runtime.io import atomic_write_json, join
from .runtime.signals import StopRequest, parse_signals
from .spark import SparK, build_spark

__all__ = ["Outcome", "RunError", "build_parser", "main", "run"]

PROG = "python -m pretrain"
logger = logging.getLogger("pretrain")
# Fields a resumed run must share with its checkpoint (the weights' and the optimiser state's shapes).
ARCHITECTURE_KEYS = ("model", "input_size", "patch_size", "decoder_width", "densify_norm", "masking",
                     "hierarchy", "ape", "opt")


class RunError(RuntimeError):
    """A run that cannot continue (non-finite loss, incompatible checkpoint, empty epoch)."""


@dataclass(frozen=True)
class Outcome:
    """How :func:`run` ended: ``completed`` (``result.json`` written) or ``stopped`` (checkpoint saved)."""

    status: str
    state: TrainState
    message: str


@dataclass
class _Run:
    """The objects of one run that checkpoints read."""

    cfg: PretrainConfig
    env: DistEnv
    spark: SparK
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    frozen: list[str]
    pm: PathManager = field(default_factory=PathManager)
    saved_step: int | None = None

    def save(self, state: TrainState, snapshot: bool = False) -> None:
        """Write ``checkpoint-last.pth`` and ``encoder_timm.pth`` (main rank; every rank must call this)."""
        rng = all_gather_objects(capture_rng())
        if self.env.is_main:
            cfg = self.cfg.to_dict()
            payload = {
                "model": self.spark.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": state.step, "steps_per_epoch": self.steps_per_epoch,
                              "total_steps": self.cfg.epochs * self.steps_per_epoch},
                "state": state.to_dict(), "epoch": state.epoch, "iteration": state.step, "rng": rng,
                "config": cfg, "world_size": self.env.world_size, "frozen_parameters": self.frozen,
            }
            save_torch(join(self.cfg.out, CHECKPOINT), payload, keep_previous=True, pm=self.pm)
            meta = {"epoch": state.epoch, "iteration": state.step, "config": cfg, "method": "SparK"}
            encoder = encoder_payload(self.spark.encoder_state_dict(), self.spark.encoder.model_name, meta)
            save_torch(join(self.cfg.out, ENCODER), encoder, pm=self.pm)
            if snapshot:
                save_torch(join(self.cfg.out, f"checkpoint-ep{state.epoch:04d}.pth"), payload, pm=self.pm)
        barrier()
        self.saved_step = state.step


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pretrain`` parser: run options plus one flag per config field."""
    parser = ArgumentParser(
        prog=PROG,
        description="SparK pretraining of a timm convnet (paper section 4.1). Values come from --preset and "
                    "are overridden by the flags given. Writes OUT/config.json, metrics.jsonl, tensorboard/, "
                    "checkpoint-last.pth, encoder_timm.pth and, on completion, result.json. Exit codes: 0 done "
                    "(or stopped by a signal after saving), 1 runtime error, 2 usage error.",
    )
    parser.add_argument("--preset", default="paper", help="bundled preset (paper, tiny) or a YAML file [paper]")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_config_arguments(parser)
    return parser


def _resume_path(cfg: PretrainConfig, pm: PathManager) -> str | None:
    existing = find_checkpoint(cfg.out, pm)
    if cfg.resume == "auto":
        return existing
    if cfg.resume:
        if not pm.exists(cfg.resume):
            raise ConfigError(f"--resume checkpoint not found: {cfg.resume}")
        return cfg.resume
    if existing:
        raise ConfigError(f"{cfg.out} already holds {existing}; pass --resume auto to continue it or choose "
                          "another --out")
    return None


def _data_path(cfg: PretrainConfig, env: DistEnv) -> str:
    if cfg.data:
        return cfg.data
    if env.is_main:  # draw the demo set once, before the other ranks look for it
        ensure_demo_data()
    barrier()
    root = ensure_demo_data()
    logger.info("no --data given: using the embedded demo set %s", root / "train")
    return str(root / "train")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_model(cfg: PretrainConfig, env: DistEnv) -> tuple[SparK, list[str]]:
    """The SparK model on the device (same initial weights on every rank) and its frozen unused parameters."""
    _seed_everything(cfg.seed)
    spark = build_spark(cfg.model, decoder_width=cfg.decoder_width, input_size=cfg.input_size,
                        drop_path_rate=cfg.drop_path_rate, mask_ratio=cfg.mask_ratio, densify_norm=cfg.densify_norm,
                        masking=cfg.masking, sparse_backend=cfg.sparse_backend, hierarchy=cfg.hierarchy, ape=cfg.ape,
                        loss_on=cfg.loss_on)
    spark.to(env.device).train()
    if cfg.channels_last:
        spark.to(memory_format=torch.channels_last)
    probe = torch.randn(2, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(cfg.seed))
    frozen = freeze_unused_parameters(spark, probe.to(env.device))
    if frozen:
        logger.info("parameters the loss never reaches (left untrained and out of DDP): %s", ", ".join(frozen))
    if env.distributed:
        replaced = sync_batchnorm(spark)
        logger.info("%d decoder BatchNorm layers synchronised over %d ranks", replaced, env.world_size)
    return spark, frozen


def _load(path: str, run: _Run, pm: PathManager) -> tuple[TrainState, Any]:
    """Restore weights, optimiser and position from ``path``; returns the state and this rank's RNG state."""
    required = ("model", "optimizer", "state", "rng", "config")
    checkpoint = load_torch(path, required, "training checkpoint of python -m pretrain", pm)
    saved = checkpoint["config"]
    changed = [key for key in ARCHITECTURE_KEYS if saved.get(key) != getattr(run.cfg, key)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(run.cfg, k)!r}" for k in changed)
        raise RunError(f"cannot resume {path}: the config changed ({details})")
    run.spark.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    state = TrainState.from_dict(checkpoint["state"])
    if checkpoint["scheduler"]["steps_per_epoch"] != run.steps_per_epoch and state.step_in_epoch:
        logger.warning("steps per epoch changed (%d -> %d): epoch %d continues at step %d of the new order",
                       checkpoint["scheduler"]["steps_per_epoch"], run.steps_per_epoch, state.epoch + 1,
                       min(state.step_in_epoch, run.steps_per_epoch))
        state.step_in_epoch = min(state.step_in_epoch, run.steps_per_epoch)
    rng = checkpoint["rng"]
    run.saved_step = state.step
    logger.info("resumed from %s: epoch %d, iteration %d", path, state.epoch + 1, state.step)
    return state, rng[run.env.rank] if len(rng) == run.env.world_size else None


def _result(cfg: PretrainConfig, state: TrainState, data: str, num_images: int, resumed: str | None) -> dict:
    losses = state.epoch_losses
    metrics = {
        "loss_first_epoch": losses[0] if losses else None, "loss_last_epoch": losses[-1] if losses else None,
        "epoch_losses": losses, "epochs": state.epoch, "iterations": state.step, "images_seen": state.images_seen,
        "skipped_images": state.skipped_images, "train_time_s": state.train_seconds,
        "images_per_s": state.images_seen / max(state.train_seconds, 1e-9),
    }
    inputs = {"data": data, "num_images": num_images, "resumed_from": resumed}
    outputs = {"checkpoint": join(cfg.out, CHECKPOINT), "encoder": join(cfg.out, ENCODER)}
    return {"stage": "pretrain", "model": cfg.model, "metrics": metrics, "config": cfg.to_dict(),
            "inputs": inputs, "outputs": outputs}


def run(cfg: PretrainConfig, env: DistEnv, stop: StopRequest | None = None) -> Outcome:
    """Pretrain as ``cfg`` says on this rank; resumes, checkpoints, logs, and writes ``result.json`` at the end.

    Raises :class:`ConfigError`, :class:`pretrain.data.DataError`, :class:`CheckpointError` or :class:`RunError`
    with a one-line message.
    """
    pm, stop = PathManager(), stop or StopRequest()
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    resume_from = _resume_path(cfg, pm)
    data = _data_path(cfg, env)
    dataset = build_pretrain_dataset(data, cfg.input_size, tuple(cfg.crop_scale))
    per_epoch = steps_per_epoch(len(dataset), cfg)
    if per_epoch == 0:
        raise DataError(f"{data}: {len(dataset)} images are fewer than one global batch of {cfg.global_batch}")
    spark, frozen = _build_model(cfg, env)
    optimizer = build_optimizer(spark, cfg)
    schedule = build_schedule(optimizer, cfg, per_epoch)
    current = _Run(cfg, env, spark, optimizer, per_epoch, frozen, pm)
    state, rng = _load(resume_from, current, pm) if resume_from else (TrainState(), None)
    if env.is_main:
        atomic_write_json(join(cfg.out, "config.json"), cfg.to_dict(), pm)
    run_logger = RunLogger(cfg.out, env.is_main, cfg.tensorboard, cfg.progress, resume_step=state.step)
    logger.info("%s on %d rank(s) (%s): %d images, %d steps/epoch, global batch %d = %d x %d ranks x %d accum, "
                "peak lr %.3g", cfg.model, env.world_size, env.device, len(dataset), per_epoch, cfg.global_batch,
                cfg.batch_size, env.world_size, cfg.grad_accum_steps, cfg.peak_lr)
    engine = Engine(wrap_ddp(spark, env), lambda b, g: spark.mask(b, env.device, generator=g), optimizer, schedule,
                    cfg, env, run_logger, stop, current.save, per_epoch)
    try:
        with stop.installed(parse_signals(cfg.stop_signals)):
            if rng is not None:
                restore_rng(rng)
            else:  # a fresh run, or another world size than the checkpoint's
                _seed_everything(derive_seed(cfg.seed, state.step, env.rank))
            for epoch in range(state.epoch, cfg.epochs):
                loader = epoch_loader(dataset, cfg, env, epoch, state.step_in_epoch * cfg.grad_accum_steps)
                if engine.train_one_epoch(loader, state):
                    return Outcome("stopped", state, f"stopped by {stop.signal_name} at epoch {state.epoch + 1}, "
                                   f"iteration {state.step}: saved {join(cfg.out, CHECKPOINT)}; run again with "
                                   "--resume auto to continue")
                loss = state.end_epoch()
                logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, cfg.epochs, loss)
                current.save(state, snapshot=bool(cfg.snapshot_every) and state.epoch % cfg.snapshot_every == 0)
    except NonFiniteError as error:
        kept = (f"the last good checkpoint is {join(cfg.out, CHECKPOINT)} (iteration {current.saved_step})"
                if current.saved_step is not None else "no checkpoint had been saved yet")
        raise RunError(f"{error} (epoch {state.epoch + 1}); stopped without saving: {kept}") from error
    finally:
        run_logger.close()
    if env.is_main:
        atomic_write_json(join(cfg.out, "result.json"), _result(cfg, state, data, len(dataset), resume_from), pm)
    return Outcome("completed", state, f"done: {state.epoch} epochs, {state.step} iterations; results in {cfg.out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 done or stopped after saving, 1 runtime error, 2 usage error)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    preset, print_config = args.pop("preset"), args.pop("print_config")
    try:
        cfg = resolve_config(preset, args, world_size=world_size_from_environment())
    except ConfigError as error:
        parser.error(str(error))
    if print_config:
        print(cfg.to_json())
        return 0
    if not cfg.out:
        parser.error("--out is required (the run folder)")
    env = init_distributed(cfg.device, cfg.dist_timeout_min)
    setup_logging(env.is_main)
    try:
        outcome = run(cfg, env)
    except ConfigError as error:
        parser.error(str(error))
    except (DataError, RunError, CheckpointError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if env.is_main:
        print(outcome.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
