"""The classifier of a run: timm model, pretrained weights, linear-probe freezing, weight EMAs, SyncBN.

Weights are read through :mod:`downstream.convert` (one reader for SparK checkpoints, ``encoder_timm.pth``,
converted files, timm checkpoints) and loaded with only the classifier missing; a fine-tuning checkpoint of this
stage (``checkpoint-last.pth`` of ``python -m downstream.cls``) is recognised by its ``stage`` entry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import timm
import torch
from timm.layers import convert_sync_batchnorm
from timm.utils import ModelEmaV3
from torch import nn

from downstream.convert import ConvertError, load_timm_weights, read_timm_weights
from pretrain.checkpoint import EncoderWeights
from pretrain.runtime.checkpoint import CheckpointError, load_torch
from pretrain.runtime.config import ConfigError
from pretrain.runtime.distributed import DistEnv
from pretrain.syncbn import sync_batchnorm

from .config import ClsConfig

__all__ = ["STAGE_KEY", "EmaBank", "build_classifier", "describe_weights", "freeze_backbone", "load_for_evaluation",
           "load_pretrained", "read_cls_checkpoint", "set_train_mode", "synchronise_batchnorm"]

logger = logging.getLogger(__name__)
STAGE_KEY = "stage"  # checkpoint entry marking a fine-tuning checkpoint of this stage (value "cls")


def build_classifier(cfg: ClsConfig, num_classes: int) -> nn.Module:
    """``timm.create_model(cfg.model, num_classes, drop_rate, drop_path_rate)``; :class:`ConfigError` if unknown."""
    drop_path = 0.0 if cfg.protocol == "linear" else cfg.drop_path
    try:
        return timm.create_model(cfg.model, num_classes=num_classes, drop_rate=cfg.drop, drop_path_rate=drop_path)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConfigError(f"cannot build model {cfg.model!r}: {error}") from error


def read_cls_checkpoint(path: str) -> dict[str, Any] | None:
    """The content of ``path`` if it is a checkpoint of this stage, else None (other files, or unreadable ones:
    :mod:`downstream.convert` then names their problem)."""
    try:
        loaded = load_torch(path)
    except CheckpointError:
        return None
    return loaded if isinstance(loaded, dict) and loaded.get(STAGE_KEY) == "cls" else None


def _cls_weights(checkpoint: dict[str, Any], path: str) -> EncoderWeights:
    return EncoderWeights(checkpoint["config"]["model"], dict(checkpoint["model"]),
                          {"source": "fine-tuning checkpoint", "path": path, "epoch": checkpoint.get("epoch")})


def load_pretrained(model: nn.Module, cfg: ClsConfig) -> str:
    """Load ``cfg.weights`` into ``model`` with only the classifier left missing; returns what was loaded.

    Raises :class:`ConvertError` / :class:`CheckpointError` (one line) for files that are missing, unreadable, of
    another architecture or with keys that do not fit.
    """
    if cfg.weights == "none":
        return "none: random initialisation"
    checkpoint = read_cls_checkpoint(cfg.weights)
    source = _cls_weights(checkpoint, cfg.weights) if checkpoint else cfg.weights
    if checkpoint and checkpoint["config"]["model"] != cfg.model:
        raise ConvertError(f"{cfg.weights} holds {checkpoint['config']['model']} weights; the model is {cfg.model}")
    report = load_timm_weights(model, source, cfg.model)
    return report.describe()


def load_for_evaluation(model: nn.Module, cfg: ClsConfig) -> tuple[dict[str, dict[str, torch.Tensor]], int | None]:
    """The state dicts to evaluate from ``cfg.weights`` (``{"model": ..., "ema0.9999": ...}``) and their epoch.

    A checkpoint of this stage gives its model and EMAs; other files (a timm checkpoint or state dict) must
    hold a classifier for this data's classes. Every state dict is checked strictly against ``model``.
    """
    if cfg.weights in ("", "none"):
        raise ConfigError("--eval-only needs --weights FILE (a fine-tuning checkpoint or classifier weights)")
    checkpoint = read_cls_checkpoint(cfg.weights)
    if checkpoint:
        states = {"model": checkpoint["model"], **EmaBank.states_in(checkpoint.get("ema") or {})}
        name, epoch = checkpoint["config"]["model"], checkpoint.get("epoch")
    else:
        weights = read_timm_weights(cfg.weights, cfg.model)
        states, name, epoch = {"model": weights.state_dict}, weights.model_name, weights.meta.get("epoch")
    if name and name != cfg.model:
        raise ConvertError(f"{cfg.weights} holds {name} weights; the model is {cfg.model}")
    for label, state in states.items():
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:300]
            classes = getattr(model.get_classifier(), "out_features", "?")
            raise ConvertError(f"{cfg.weights} ({label}) does not fit {cfg.model} with {classes} classes "
                               f"(--eval-only needs a trained classifier, e.g. a fine-tuning checkpoint-last.pth): "
                               f"{detail}") from error
    return states, epoch


def freeze_backbone(model: nn.Module) -> list[str]:
    """Linear probing: freeze everything but the classifier, re-initialise it N(0, 0.01) with zero bias (MoCo v3);
    returns the names of the trainable parameters."""
    head = model.get_classifier()
    trainable = {id(p) for p in head.parameters()}
    if not trainable:
        raise ConfigError(f"{type(model).__name__} has no classifier parameters to train")
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("weight"):
                param.normal_(0.0, 0.01)
            else:
                param.zero_()
    return [name for name, p in model.named_parameters() if p.requires_grad]


def set_train_mode(model: nn.Module, protocol: str) -> None:
    """Training mode for fine-tuning; eval mode throughout for linear probing (frozen BatchNorm statistics)."""
    model.train(protocol != "linear")


def synchronise_batchnorm(model: nn.Module, env: DistEnv) -> nn.Module:
    """BatchNorm statistics over all ranks: timm's ``convert_sync_batchnorm`` on GPUs (``SyncBatchNorm`` handles
    timm's ``BatchNormAct2d`` too), the suite's rank-synced BatchNorm on CPUs (``SyncBatchNorm`` needs CUDA)."""
    if not env.distributed:
        return model
    if env.device.type == "cuda":
        return convert_sync_batchnorm(model)
    replaced = sync_batchnorm(model)
    logger.info("%d BatchNorm layers synchronised over %d CPU ranks", replaced, env.world_size)
    return model


class EmaBank:
    """One timm ``ModelEmaV3`` per decay, named ``ema<decay>`` (``ema0.9999``); saved as one checkpoint entry."""

    def __init__(self, model: nn.Module, decays: Sequence[float]) -> None:
        self.emas = {f"ema{decay:g}": ModelEmaV3(model, decay=decay) for decay in decays}

    def __iter__(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, averaged module)`` pairs."""
        return ((name, ema.module) for name, ema in self.emas.items())

    def update(self, model: nn.Module) -> None:
        for ema in self.emas.values():
            ema.update(model)

    def state_dict(self) -> dict[str, Any]:
        return {name: ema.state_dict() for name, ema in self.emas.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.emas):
            raise ValueError(f"the checkpoint holds EMAs {sorted(state)}, this run tracks {sorted(self.emas)}")
        for name, ema in self.emas.items():
            ema.load_state_dict(state[name])

    @staticmethod
    def states_in(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """The averaged models' own state dicts (``module.`` prefix removed) of a saved :meth:`state_dict`."""
        return {name: {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
                for name, ema in state.items()}


def describe_weights(path: str) -> str:
    """``path`` as result.json records it: the absolute file, or ``none``."""
    return path if path in ("", "none") else os.path.abspath(path)
