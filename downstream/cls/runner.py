"""One fine-tuning (or linear-probing) run on this rank, built on the shared run machinery (:mod:`pretrain.runtime`).

The run folder gets ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-last.pth`` (model,
optimiser, every weight EMA, position, RNG states, evaluation curve) and, when training completes,
``result.json``. ``--eval-only`` evaluates given weights and writes ``config.json`` and ``result.json`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from pretrain.data import DataError, collate_skip_corrupt
from pretrain.info import model_info
from pretrain.runtime import loop
from pretrain.runtime.checkpoint import CHECKPOINT, restore_rng
from pretrain.runtime.checkpointer import Checkpointer
from pretrain.runtime.config import ConfigError
from pretrain.runtime.distributed import DistEnv, wrap_ddp
from pretrain.runtime.errors import SuiteError
from pretrain.runtime.io import atomic_write_json, join
from pretrain.runtime.precision import Precision
from pretrain.runtime.result import write_result
from pretrain.runtime.runlog import RunLogger
from pretrain.runtime.signals import StopRequest, parse_signals
from pretrain.runtime.stage import Outcome, find_resume_path, prepare_run, seed_everything

from .config import ClsConfig
from .data import ClsData, build_data, eval_loader, train_sampler
from .evaluate import EmaHook, EvalHook, curve_entry, evaluate_all, summarise
from .layer_decay import published_param_groups
from .model import (
    STAGE_KEY,
    EmaBank,
    build_classifier,
    describe_weights,
    freeze_backbone,
    load_for_evaluation,
    load_pretrained,
    set_train_mode,
    synchronise_batchnorm,
)
from .task import ClsTask, build_criterion, build_mixup

__all__ = ["COMPAT_KEYS", "RunError", "build_optimizer", "build_schedule", "finetune"]

logger = logging.getLogger("downstream.cls")
# Settings a resumed run must share with its checkpoint (the shapes of the saved weights, optimiser state, EMAs).
COMPAT_KEYS = ("model", "protocol", "num_classes", "opt", "weight_decay", "layer_decay", "layer_decay_groups",
               "ema_decays")


class RunError(SuiteError, RuntimeError):
    """A run that cannot continue (non-finite loss)."""


def build_optimizer(model: nn.Module, cfg: ClsConfig) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` for ``cfg``: no weight decay on biases and norms, layer-wise decay with timm's
    grouping or the published one (own parameter groups), the classifier alone when linear probing. LAMB's own
    gradient-norm clipping is off (``clip_grad`` clips, in the loop)."""
    kwargs: dict[str, Any] = {} if cfg.opt_eps is None else {"eps": cfg.opt_eps}
    if cfg.opt == "lamb":
        kwargs.update(bias_correction=cfg.lamb_bias_correction, always_adapt=cfg.lamb_always_adapt,
                      max_grad_norm=None)
    common = dict(opt=cfg.opt, lr=cfg.peak_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **kwargs)
    if cfg.protocol == "linear":
        return create_optimizer_v2([p for p in model.parameters() if p.requires_grad], **common)
    if cfg.layer_decay is not None and cfg.layer_decay_groups == "published":
        groups = published_param_groups(model, cfg.weight_decay, cfg.layer_decay)
        return create_optimizer_v2(model, param_group_fn=lambda _: groups, **common)
    return create_optimizer_v2(model, layer_decay=cfg.layer_decay, **common)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ClsConfig, steps_per_epoch: int
                   ) -> Callable[[int], Mapping[str, float]]:
    """Per-step linear warm-up from ``warmup_lr_ratio`` x peak, then cosine to ``min_lr_ratio`` x peak (timm's
    ``CosineLRScheduler``, which also applies each group's ``lr_scale``); returns ``schedule(step) -> {"lr"}``.

    The cosine reaches its floor at the last step, ``total - 1``, as the published SparK code's ``lr_wd_annealing``
    does (tests/test_parity_cls.py)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total - warmup - 1, 1),
                                  lr_min=cfg.peak_lr * cfg.min_lr_ratio,
                                  warmup_t=warmup, warmup_lr_init=cfg.peak_lr * cfg.warmup_lr_ratio,
                                  warmup_prefix=True, t_in_epochs=False)

    def schedule(step: int) -> Mapping[str, float]:
        scheduler.step_update(step)
        return {"lr": max(group["lr"] for group in optimizer.param_groups)}

    return schedule


def _prepare_model(cfg: ClsConfig, env: DistEnv, precision: Precision, num_classes: int) -> nn.Module:
    """The classifier on the device in the run's memory format, with its seeded initialisation."""
    seed_everything(cfg.seed)
    model = build_classifier(cfg, num_classes)
    model.to(env.device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _size_metrics(cfg: ClsConfig) -> dict[str, float]:
    """Parameters and fvcore FLOPs of the architecture at the run's resolution (table 4's convention)."""
    info = model_info(cfg.model, cfg.input_size)
    return {"params_m": info.params_m, "flops_g": info.flops_g}


def _write_outcome(cfg: ClsConfig, data: ClsData, curve: list[dict[str, Any]], extra: Mapping[str, Any],
                   inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
    metrics = {**summarise(curve), "protocol": cfg.protocol, **_size_metrics(cfg), "num_classes": cfg.num_classes,
               **extra}
    inputs = {"weights": describe_weights(cfg.weights), "data": data.root, "num_val": len(data.val), **inputs}
    write_result(cfg.out, "cls", cfg.model, metrics, cfg.to_dict(), inputs, outputs)


def _evaluate_only(cfg: ClsConfig, env: DistEnv, precision: Precision) -> Outcome:
    data = build_data(cfg, need_train=False)
    cfg.num_classes = len(data.classes)
    model = _prepare_model(cfg, env, precision, cfg.num_classes)
    states, epoch = load_for_evaluation(model, cfg)
    if env.is_main:
        atomic_write_json(join(cfg.out, "config.json"), cfg.to_dict())

    def loaded(name: str) -> nn.Module:
        model.load_state_dict(states[name])
        return model

    loader = eval_loader(data.val, cfg, env)
    results = evaluate_all(((name, loaded(name)) for name in states), loader, env, precision)
    entry = curve_entry(epoch or 0, results)
    if env.is_main:
        _write_outcome(cfg, data, [entry], {"eval_only": True}, {}, {})
    return Outcome("completed", f"evaluated {cfg.weights}: top-1 {entry['top1']:.2f}, top-5 {entry['top5']:.2f} "
                                f"({entry['weights']}); results in {cfg.out}", cfg.out)


def _train_metrics(state: loop.TrainState) -> dict[str, Any]:
    return {"epochs": state.epoch, "iterations": state.step, "epoch_losses": state.epoch_losses,
            "images_seen": state.images_seen, "skipped_images": state.skipped_images,
            "train_time_s": state.train_seconds}


def _hooks(cfg: ClsConfig, model: nn.Module, emas: EmaBank, data: ClsData, env: DistEnv) -> list[loop.Hook]:
    """Metrics, EMA updates, periodic saves, evaluation, epoch-end saves: in this order (saves hold the EMAs,
    the epoch-end checkpoint holds the evaluation)."""
    evaluation = EvalHook(lambda: [("model", model), *emas], eval_loader(data.val, cfg, env), cfg.eval_every,
                          cfg.epochs, lambda: set_train_mode(model, cfg.protocol))
    return [loop.MetricsHook(cfg.log_every), EmaHook(lambda: emas.update(model)),
            loop.PeriodicSaveHook(cfg.save_every), evaluation, loop.EpochSaveHook(cfg.snapshot_every)]


def _train(trainer: loop.Trainer, cfg: ClsConfig, data: ClsData, sampler: Any, rng: Any) -> Outcome | None:
    """The epochs left; an :class:`Outcome` ``stopped`` if a stop signal ended them early (checkpoint saved)."""
    state, env, stop = trainer.state, trainer.env, trainer.stop
    with stop.installed(parse_signals(cfg.stop_signals)):
        if rng is not None:
            restore_rng(rng)
        else:  # a fresh run, or another number of ranks than the checkpoint's
            seed_everything(loop.derive_seed(cfg.seed, state.step, env.rank))
        for hook in trainer.hooks:
            hook.before_train(trainer)
        while state.epoch < cfg.epochs:
            set_train_mode(trainer.task.model, cfg.protocol)
            skip = state.step_in_epoch * cfg.grad_accum_steps
            batches = loop.epoch_loader(data.train, sampler, cfg.batch_size, state.epoch, skip, cfg.workers,
                                        cfg.seed, env, collate_skip_corrupt)
            if trainer.train_epoch(batches):
                return Outcome("stopped", f"stopped by {stop.signal_name} in epoch {state.epoch + 1} at iteration "
                                          f"{state.step}: saved {join(cfg.out, CHECKPOINT)}; run again with "
                                          "--resume auto to continue", cfg.out, stop.signal_name)
            logger.info("epoch %d/%d: mean training loss %.4f", state.epoch + 1, cfg.epochs, trainer.end_epoch())
    return None


def finetune(cfg: ClsConfig, env: DistEnv, stop: StopRequest | None = None) -> Outcome:
    """Fine-tune (or linear-probe) as ``cfg`` says on this rank: resumes, evaluates, checkpoints, logs, and writes
    ``result.json`` at the end. Bad input raises a one-line :class:`SuiteError` before any training."""
    precision = prepare_run(cfg, env.device)
    if cfg.eval_only:
        return _evaluate_only(cfg, env, precision)
    if not cfg.weights:
        raise ConfigError("--weights is required: a converted file (python -m downstream.convert timm SRC DST), "
                          "encoder_timm.pth, or none to train from scratch")
    if cfg.protocol == "linear" and cfg.preset != "linear":
        logger.warning("linear probing with recipe %r, whose hyperparameters are for fine-tuning; the linear-probe "
                       "recipe is --recipe linear", cfg.preset)
    resume_from = find_resume_path(cfg.out, cfg.resume)
    data = build_data(cfg)
    assert data.train is not None
    cfg.num_classes = len(data.classes)
    sampler = train_sampler(data.train, cfg, env)
    per_epoch = len(sampler) // cfg.batch_size // cfg.grad_accum_steps
    if per_epoch == 0:
        raise DataError(f"{data.root}/train: {len(sampler)} images per rank are fewer than one optimiser step "
                        f"({cfg.batch_size} x {cfg.grad_accum_steps} accumulation)")

    model = _prepare_model(cfg, env, precision, cfg.num_classes)
    logger.info("weights: %s", load_pretrained(model, cfg) if resume_from is None else f"from {resume_from}")
    if cfg.protocol == "linear":
        logger.info("linear probe: training %s only, backbone frozen in eval mode", ", ".join(freeze_backbone(model)))
    emas = EmaBank(model, cfg.ema_decays)  # before SyncBN, as the published code
    if cfg.sync_bn:
        model = synchronise_batchnorm(model, env)
    optimizer = build_optimizer(model, cfg)
    checkpointer = Checkpointer(
        cfg.out, env, {"model": model, "optimizer": optimizer, "ema": emas}, cfg.to_dict(), per_epoch,
        cfg.epochs * per_epoch, COMPAT_KEYS, "fine-tuning checkpoint of python -m downstream.cls",
        extra=lambda state: {STAGE_KEY: "cls", "classes": list(data.classes)})
    state, rng = checkpointer.load(resume_from) if resume_from else (loop.TrainState(), None)
    if env.is_main:
        atomic_write_json(join(cfg.out, "config.json"), cfg.to_dict())
    logger.info("%s %s on %d rank(s) (%s): %d classes, %d train / %d val images, %d steps/epoch, global batch %d = "
                "%d x %d ranks x %d accum, peak lr %.3g, EMAs %s", cfg.protocol, cfg.model, env.world_size,
                env.device, cfg.num_classes, len(data.train), len(data.val), per_epoch, cfg.global_batch,
                cfg.batch_size, env.world_size, cfg.grad_accum_steps, cfg.peak_lr, cfg.ema_decays or "none")

    mixup = build_mixup(cfg, cfg.num_classes)
    task = ClsTask(wrap_ddp(model, env), build_criterion(cfg, mixup is not None), mixup)
    settings = loop.LoopSettings(cfg.epochs, per_epoch, cfg.grad_accum_steps, cfg.clip_grad, cfg.seed)
    run_logger = RunLogger(cfg.out, env.is_main, cfg.tensorboard, cfg.progress, resume_step=state.step)
    trainer = loop.Trainer(task, optimizer, build_schedule(optimizer, cfg, per_epoch), settings, env, precision,
                           run_logger, stop or StopRequest(), checkpointer.save, state,
                           _hooks(cfg, model, emas, data, env))
    try:
        stopped = _train(trainer, cfg, data, sampler, rng)
    except loop.NonFiniteError as error:
        raise RunError(f"{error} (epoch {state.epoch + 1}); the last checkpoint {checkpointer.path} is kept "
                       f"(iteration {checkpointer.saved_step})") from error
    finally:
        run_logger.close()
    if stopped:
        return stopped
    if env.is_main:
        inputs = {"resumed_from": resume_from, "num_train": len(data.train), "classes": list(data.classes)}
        _write_outcome(cfg, data, state.extra["curve"], _train_metrics(state), inputs,
                       {"checkpoint": checkpointer.path})
    best = summarise(state.extra["curve"])
    return Outcome("completed", f"done: {state.epoch} epochs, best top-1 {best['top1']:.2f} ({best['best_weights']}, "
                                f"epoch {best['best_epoch']}); results in {cfg.out}", cfg.out)
