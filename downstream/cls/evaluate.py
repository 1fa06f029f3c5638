"""Top-1/top-5 on the val split for the model and each weight EMA, the evaluation curve, and the loop hooks.

The reported number follows the published SparK code: the best over evaluations of the maximum over the model
and its EMAs (``top1``); ``top5`` is that same evaluation's top-5 (one set of weights, one epoch). ``final_*``
are the last evaluation's numbers, again the best of the model and its EMAs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader

from pretrain.runtime.distributed import DistEnv, all_reduce_sum
from pretrain.runtime.loop import Hook, StepResult, Trainer
from pretrain.runtime.precision import Precision

__all__ = ["Accuracy", "EmaHook", "EvalHook", "curve_entry", "evaluate", "evaluate_all", "summarise"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy in percent over ``images`` images (all ranks)."""

    top1: float
    top5: float
    images: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, precision: Precision) -> Accuracy:
    """Accuracy of ``model`` (in eval mode; its mode is restored) on every rank's share of the val split."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # top-1 hits, top-5 hits, images
    for images, labels, _ in loader:
        if not len(images):
            continue
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        if precision.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast(env.device):
            logits = model(images)
        top1, top5 = accuracy(logits.float(), labels, topk=(1, 5))
        count = labels.shape[0]
        totals += torch.stack([(top1 * count / 100).round(), (top5 * count / 100).round(),
                               torch.tensor(float(count), device=env.device)]).double()
    all_reduce_sum(totals)
    model.train(was_training)
    hits1, hits5, images = totals.tolist()
    return Accuracy(100 * hits1 / max(images, 1), 100 * hits5 / max(images, 1), int(images))


def evaluate_all(models: Iterable[tuple[str, nn.Module]], loader: DataLoader, env: DistEnv,
                 precision: Precision) -> dict[str, Accuracy]:
    """:func:`evaluate` each named model (``model``, ``ema0.99``...)."""
    return {name: evaluate(model, loader, env, precision) for name, model in models}


def curve_entry(epoch: int, results: Mapping[str, Accuracy]) -> dict[str, Any]:
    """One evaluation as result.json's ``curve`` holds it: ``epoch``, the best weights' ``top1``/``top5``,
    ``weights`` (their name) and ``images`` (evaluated over all ranks), then ``<name>_top1``/``<name>_top5`` of
    every evaluated model."""
    best = max(results, key=lambda name: results[name].top1)  # ties: the first (the model before its EMAs)
    entry: dict[str, Any] = {"epoch": epoch, "top1": results[best].top1, "top5": results[best].top5, "weights": best,
                             "images": results[best].images}
    for name, result in results.items():
        entry[f"{name}_top1"], entry[f"{name}_top5"] = result.top1, result.top5
    return entry


def summarise(curve: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The headline metrics of a curve: best ``top1``/``top5`` (and where), ``final_top1``/``final_top5``."""
    best = max(curve, key=lambda entry: entry["top1"])  # ties: the earliest
    final = curve[-1]
    return {"top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"], "best_weights": best["weights"],
            "final_top1": final["top1"], "final_top5": final["top5"], "final_weights": final["weights"],
            "curve": list(curve)}


class EmaHook(Hook):
    """Updates every weight EMA after each optimiser step (before the step's checkpoint, so saves hold it)."""

    def __init__(self, update: Callable[[], None]) -> None:
        self.update = update

    def after_step(self, trainer: Trainer, result: StepResult, scalars: Mapping[str, float]) -> None:
        self.update()


class EvalHook(Hook):
    """Evaluates the model and its EMAs every ``every`` epochs and after the last; appends the result to
    ``state.extra['curve']`` (saved with the checkpoints), logs ``eval/*`` to metrics.jsonl and TensorBoard, then
    calls ``resume_training()`` (the protocol's train/eval mode). Put it before the epoch-end save hook."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, nn.Module]]], loader: DataLoader, every: int,
                 epochs: int, resume_training: Callable[[], None]) -> None:
        self.models, self.loader, self.every, self.epochs = models, loader, every, epochs
        self.resume_training = resume_training

    def after_epoch(self, trainer: Trainer) -> None:
        state = trainer.state
        if state.epoch % self.every and state.epoch != self.epochs:
            return
        results = evaluate_all(self.models(), self.loader, trainer.env, trainer.precision)
        entry = curve_entry(state.epoch, results)
        state.extra.setdefault("curve", []).append(entry)
        scalars = {f"eval/{key}": value for key, value in entry.items() if key not in ("epoch", "weights", "images")}
        trainer.logger.log({"step": state.step, "epoch": state.epoch, **scalars})
        logger.info("epoch %d: %s", state.epoch, ", ".join(
            f"{name} top-1 {result.top1:.2f} top-5 {result.top5:.2f}" for name, result in results.items()))
        self.resume_training()
