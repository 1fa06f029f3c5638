"""``model_best.pth``: the weights behind a fine-tuning run's reported top-1, in timm's checkpoint layout.

The reported top-1 is the best over evaluations of the best of the model and its EMAs
(:func:`downstream.cls.evaluate.summarise`); whenever an evaluation sets a new best (strictly higher; ties keep the
earlier), the main rank writes the winning weights (the EMA's when an EMA won) atomically as
``{"state_dict", "arch", "epoch", "metric", "top5", "weights", "version", "args"}``, as timm's ``train.py``
``CheckpointSaver`` writes its ``model_best.pth`` (``arch``: the timm model name, ``args``: the run's config). So
``timm.models.load_checkpoint(model, path)`` and every ``--weights`` of this suite read it. The file stays in the
run folder across a resume: the evaluation curve saved with the checkpoints carries the best so far.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from pretrain.runtime.checkpoint import save_torch
from pretrain.runtime.io import join
from pretrain.runtime.loop import Hook, Trainer

__all__ = ["BEST", "BestWeightsHook", "best_payload"]

logger = logging.getLogger(__name__)
BEST = "model_best.pth"


def best_payload(model: nn.Module, arch: str, entry: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``model_best.pth`` for ``model`` (the winning weights) and its curve ``entry``."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "arch": arch,
            "epoch": entry["epoch"], "metric": entry["top1"], "top5": entry["top5"], "weights": entry["weights"],
            "version": 2, "args": dict(record)}


class BestWeightsHook(Hook):
    """After the evaluation hook: writes ``OUT/model_best.pth`` when the newest curve entry is a new best."""

    def __init__(self, out: str, arch: str, models: Callable[[], Iterable[tuple[str, nn.Module]]],
                 record: Mapping[str, Any]) -> None:
        self.out, self.arch, self.models, self.record = out, arch, models, record

    def after_epoch(self, trainer: Trainer) -> None:
        curve = trainer.state.extra.get("curve") or []
        if not curve or curve[-1]["epoch"] != trainer.state.epoch:
            return  # no evaluation this epoch
        entry = curve[-1]
        if any(earlier["top1"] >= entry["top1"] for earlier in curve[:-1]) or not trainer.env.is_main:
            return
        model = dict(self.models())[entry["weights"]]
        save_torch(join(self.out, BEST), best_payload(model, self.arch, entry, self.record))
        logger.info("epoch %d: new best top-1 %.2f (%s) saved as %s", entry["epoch"], entry["top1"],
                    entry["weights"], BEST)
