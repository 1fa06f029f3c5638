"""The classifier of a run: timm model, pretrained weights, linear-probe freezing, weight EMAs, SyncBN.

Weights are read through :func:`pretrain.weights.read_weights` (every layout the suite knows: its own checkpoints,
``encoder_timm.pth``, timm checkpoints, the released SparK files...) and loaded with only the classifier missing; a
fine-tuning checkpoint of this stage (``checkpoint-last.pth`` of ``python -m downstream.cls``) also gives its EMAs
to ``--eval-only``.
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

from downstream.convert.to_timm import ConvertError, load_timm_weights, read_for_model
from pretrain.runtime.config import ConfigError
from pretrain.runtime.distributed import DistEnv
from pretrain.syncbn import sync_batchnorm
from pretrain.weights.suite import STAGE_KEY

from .config import ClsConfig

__all__ = ["STAGE_KEY", "EmaBank", "build_classifier", "describe_weights", "freeze_backbone", "load_for_evaluation",
           "load_pretrained", "set_train_mode", "synchronise_batchnorm"]

logger = logging.getLogger(__name__)


def build_classifier(cfg: ClsConfig, num_classes: int) -> nn.Module:
    """``timm.create_model(cfg.model, num_classes, drop_rate, drop_path_rate[, ls_init_value])``;
    :class:`ConfigError` if the model is unknown or takes no layer scale."""
    drop_path = 0.0 if cfg.protocol == "linear" else cfg.drop_path
    extra = {} if cfg.ls_init_value is None else {"ls_init_value": cfg.ls_init_value}
    try:
        return timm.create_model(cfg.model, num_classes=num_classes, drop_rate=cfg.drop, drop_path_rate=drop_path,
                                 **extra)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConfigError(f"cannot build model {cfg.model!r}: {error}") from error
    except TypeError as error:  # a model without layer scale given --ls-init-value
        raise ConfigError(f"cannot build model {cfg.model!r} with ls_init_value {cfg.ls_init_value}: {error}") \
            from error


def load_pretrained(model: nn.Module, cfg: ClsConfig) -> str:
    """Load ``cfg.weights`` into ``model`` with only the classifier left missing; returns what was loaded.

    Raises :class:`~pretrain.weights.WeightsError` (one line) for files that are missing, unreadable, unsafe to
    unpickle (without ``cfg.trust_weights``), of another architecture or with keys that do not fit.
    """
    if cfg.weights == "none":
        return "none: random initialisation"
    return load_timm_weights(model, cfg.weights, cfg.model, trust=cfg.trust_weights).describe()


def load_for_evaluation(model: nn.Module, cfg: ClsConfig) -> tuple[dict[str, dict[str, torch.Tensor]], int | None]:
    """The state dicts to evaluate from ``cfg.weights`` (``{"model": ..., "ema0.9999": ...}``) and their epoch.

    A checkpoint of this stage gives its model and EMAs (a timm checkpoint its ``state_dict_ema``); other files
    must hold a classifier for this data's classes. Every state dict is checked strictly against ``model``.
    """
    if cfg.weights in ("", "none"):
        raise ConfigError("--eval-only needs --weights FILE (a fine-tuning checkpoint or classifier weights)")
    weights = read_for_model(cfg.weights, cfg.model, trust=cfg.trust_weights)
    states = {"model": weights.state_dict, **weights.variants}
    for label, state in states.items():
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:300]
            classes = getattr(model.get_classifier(), "out_features", "?")
            raise ConvertError(f"{cfg.weights} ({label}) does not fit {cfg.model} with {classes} classes "
                               f"(--eval-only needs a trained classifier, e.g. a fine-tuning checkpoint-last.pth): "
                               f"{detail}") from error
    return states, weights.meta.get("epoch")


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


def describe_weights(path: str) -> str:
    """``path`` as result.json records it: the absolute file, or ``none``."""
    return path if path in ("", "none") else os.path.abspath(path)
