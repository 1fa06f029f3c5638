"""One fine-tuning (or linear-probing) run on this rank, built on the shared run machinery (:mod:`pretrain.runtime`).

The run folder gets ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-last.pth`` (model,
optimiser, every weight EMA, position, RNG states, evaluation curve), ``model_best.pth`` (the weights behind the
best top-1, timm's checkpoint layout: :mod:`downstream.cls.best`) and, when training completes, ``result.json``.
``--eval-only`` evaluates given weights and writes ``config.json`` and ``result.json`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from pretrain.data import collate_skip_corrupt, demo_data_for_run
from pretrain.info import model_info
from pretrain.runtime import loop
from pretrain.runtime.checkpoint import seed_everything
from pretrain.runtime.config import DEMO_DATA, run_record
from pretrain.runtime.distributed import DistEnv, wrap_ddp
from pretrain.runtime.errors import RunError
from pretrain.runtime.io import atomic_write_json, join
from pretrain.runtime.precision import Precision
from pretrain.runtime.result import write_result
from pretrain.runtime.schedule import build_schedule
from pretrain.runtime.signals import StopRequest
from pretrain.runtime.stage import Outcome, find_resume_path, prepare_run
from pretrain.runtime.training import TrainingJob, train
from pretrain.weights.suite import CLS_STAGE

from .best import BEST, BestWeightsHook
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

# build_schedule: the one lr schedule of every training stage (pretrain.runtime.schedule), re-exported here.
__all__ = ["COMPAT_KEYS", "RunError", "TrainModeHook", "build_optimizer", "build_schedule", "finetune"]

logger = logging.getLogger("downstream.cls")
# Settings a resumed run must share with its checkpoint (the shapes of the saved weights, optimiser state, EMAs).
COMPAT_KEYS = ("model", "protocol", "num_classes", "opt", "weight_decay", "layer_decay", "layer_decay_groups",
               "ema_decays")


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


class TrainModeHook(loop.Hook):
    """Puts the model in its protocol's training mode before every epoch (linear probing: the backbone stays in
    eval mode, its BatchNorm statistics untouched)."""

    def __init__(self, model: nn.Module, protocol: str) -> None:
        self.model, self.protocol = model, protocol

    def before_epoch(self, trainer: loop.Trainer) -> None:
        set_train_mode(self.model, self.protocol)


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


def _data(cfg: ClsConfig, env: DistEnv, need_train: bool = True) -> ClsData:
    if cfg.data != DEMO_DATA:
        return build_data(cfg, need_train)
    root = demo_data_for_run(env.is_main)
    logger.info("--data %s (recipe %s): the embedded demo set %s", DEMO_DATA, cfg.preset, root)
    return build_data(cfg, need_train, root)


def _write_outcome(cfg: ClsConfig, data: ClsData, curve: list[dict[str, Any]], extra: Mapping[str, Any],
                   inputs: Mapping[str, Any], outputs: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    metrics = {**summarise(curve), "protocol": cfg.protocol, **_size_metrics(cfg), "num_classes": len(data.classes),
               **extra}
    inputs = {"weights": describe_weights(cfg.weights), "data": data.root, "num_val": len(data.val), **inputs}
    write_result(cfg.out, "cls", cfg.model, metrics, dict(record), inputs, outputs)


def _evaluate_only(cfg: ClsConfig, env: DistEnv, precision: Precision) -> Outcome:
    data = _data(cfg, env, need_train=False)
    model = _prepare_model(cfg, env, precision, len(data.classes))
    states, epoch = load_for_evaluation(model, cfg)
    record = run_record(cfg, precision=precision.to_dict(), num_classes=len(data.classes))
    if env.is_main:
        atomic_write_json(join(cfg.out, "config.json"), record)

    def loaded(name: str) -> nn.Module:
        model.load_state_dict(states[name])
        return model

    loader = eval_loader(data.val, cfg, env)
    results = evaluate_all(((name, loaded(name)) for name in states), loader, env, precision)
    entry = curve_entry(epoch or 0, results)
    if env.is_main:
        _write_outcome(cfg, data, [entry], {"eval_only": True}, {}, {}, record)
    return Outcome("completed", f"evaluated {cfg.weights}: top-1 {entry['top1']:.2f}, top-5 {entry['top5']:.2f} "
                                f"({entry['weights']}); results in {cfg.out}", cfg.out)


def _train_metrics(state: loop.TrainState) -> dict[str, Any]:
    return {"epochs": state.epoch, "iterations": state.step, "epoch_losses": state.epoch_losses,
            "images_seen": state.images_seen, "skipped_images": state.skipped_images,
            "train_time_s": state.train_seconds}


def finetune(cfg: ClsConfig, env: DistEnv, stop: StopRequest | None = None) -> Outcome:
    """Fine-tune (or linear-probe) as ``cfg`` says on this rank: resumes, evaluates, checkpoints, logs, and writes
    ``result.json`` at the end. Bad input raises a one-line :class:`SuiteError` before any training."""
    precision = prepare_run(cfg, env.device)
    if cfg.eval_only:
        return _evaluate_only(cfg, env, precision)
    if cfg.protocol == "linear" and cfg.preset != "linear":
        logger.warning("linear probing with recipe %r, whose hyperparameters are for fine-tuning; the linear-probe "
                       "recipe is --recipe linear", cfg.preset)
    resume_from = find_resume_path(cfg.out, cfg.resume)
    data = _data(cfg, env)
    assert data.train is not None
    num_classes = len(data.classes)
    model = _prepare_model(cfg, env, precision, num_classes)
    logger.info("weights: %s", load_pretrained(model, cfg) if resume_from is None else f"from {resume_from}")
    if cfg.protocol == "linear":
        logger.info("linear probe: training %s only, backbone frozen in eval mode", ", ".join(freeze_backbone(model)))
    emas = EmaBank(model, cfg.ema_decays)  # before SyncBN, as the published code
    if cfg.sync_bn:
        model = synchronise_batchnorm(model, env)
    optimizer = build_optimizer(model, cfg)
    mixup = build_mixup(cfg, num_classes)

    def evaluated() -> list[tuple[str, nn.Module]]:
        return [("model", model), *emas]

    evaluation = EvalHook(evaluated, eval_loader(data.val, cfg, env), cfg.eval_every, cfg.epochs,
                          lambda: set_train_mode(model, cfg.protocol))
    record = run_record(cfg, precision=precision.to_dict(), num_classes=num_classes)
    job = TrainingJob(
        ClsTask(wrap_ddp(model, env), build_criterion(cfg, mixup is not None), mixup), optimizer,
        loop.EpochData(data.train, train_sampler(data.train, cfg, env), cfg.batch_size, cfg.workers, cfg.seed,
                       collate_skip_corrupt),
        {"model": model, "optimizer": optimizer, "ema": emas}, COMPAT_KEYS,
        "fine-tuning checkpoint of python -m downstream.cls",
        step_hooks=[TrainModeHook(model, cfg.protocol), EmaHook(lambda: emas.update(model))],
        epoch_hooks=[evaluation, BestWeightsHook(cfg.out, cfg.model, evaluated, record)],
        extra=lambda state: {STAGE_KEY: CLS_STAGE, "classes": list(data.classes)},
        summary=f"{cfg.protocol}, {num_classes} classes, {len(data.train)} train / {len(data.val)} val images, "
                f"EMAs {list(cfg.ema_decays) or 'none'}")
    end = train(cfg, env, stop or StopRequest(), precision, job, record, resume_from)
    if end.stopped:
        return end.stopped
    state = end.state
    if env.is_main:
        inputs = {"resumed_from": resume_from, "num_train": len(data.train), "classes": list(data.classes)}
        outputs = {"checkpoint": end.checkpoint, "best": join(cfg.out, BEST)}
        _write_outcome(cfg, data, state.extra["curve"], _train_metrics(state), inputs, outputs, record)
    best = summarise(state.extra["curve"])
    return Outcome("completed", f"done: {state.epoch} epochs, best top-1 {best['top1']:.2f} ({best['best_weights']}, "
                                f"epoch {best['best_epoch']}); results in {cfg.out}", cfg.out)
