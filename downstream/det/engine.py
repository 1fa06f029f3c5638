"""Detectron2's trainer with the suite's parts: AdamW with layer decay, bf16 autocast, atomic checkpoints, stops.

:class:`DetTrainer` is Detectron2's ``DefaultTrainer`` (its hooks, writers, lr schedule, data loaders, COCO
evaluation) with these differences:

- the optimiser of :mod:`.optim`; the training forward runs under the run's one autocast,
  :meth:`pretrain.runtime.precision.Precision.autocast` (:class:`PrecisionTrainer`, as Detectron2's
  ``AMPTrainer`` does for fp16; bf16 where the hardware computes it natively), the model in the run's memory
  format; evaluation stays fp32;
- DDP with ``device_ids=None`` on CPU ranks (Detectron2 0.6 passes a GPU index), so gloo ranks train too;
- checkpoints are written atomically to ``OUT/checkpoint-last.pth`` (the previous one kept as ``.prev``) every
  ``SOLVER.CHECKPOINT_PERIOD`` iterations and at the end, plus ``OUT/model_final.pth`` (weights only);
- every rank checks a :class:`~pretrain.runtime.signals.StopRequest` before each iteration (agreed over ranks);
  a stop saves ``checkpoint-last.pth`` at the last finished iteration and ends the loop without evaluating;
- metrics go to ``OUT/metrics.jsonl`` and ``OUT/tensorboard/``; evaluation runs through :mod:`.evaluation`.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, EventStorage, JSONWriter, TensorboardXWriter
from fvcore.nn.precise_bn import get_bn_modules
from torch import nn

from pretrain.runtime.checkpoint import CHECKPOINT, find_checkpoint, load_torch, save_torch
from pretrain.runtime.io import join
from pretrain.runtime.precision import Precision
from pretrain.runtime.signals import StopRequest

from . import backbone as _backbone  # noqa: F401  (registers build_timm_fpn_backbone)
from .augment import build_train_mapper
from .evaluation import evaluate_coco
from .optim import build_optimizer
from .weights import WeightsReport, load_detection_weights, unwrap

__all__ = ["FINAL_WEIGHTS", "DetTrainer", "PrecisionTrainer", "RunCheckpointer"]

logger = logging.getLogger(__name__)
FINAL_WEIGHTS = "model_final.pth"
LOG_PERIOD = 20  # iterations between metric lines (Detectron2's default)


class PrecisionTrainer(SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` step with the forward pass under the run's autocast (``precision``), as
    Detectron2's ``AMPTrainer`` runs it under fp16 autocast; the backward pass and the update stay outside it."""

    def __init__(self, model: nn.Module, data_loader: Any, optimizer: torch.optim.Optimizer,
                 precision: Precision, device: torch.device) -> None:
        super().__init__(model, data_loader, optimizer)
        self.precision, self.device = precision, device

    def run_step(self) -> None:
        assert self.model.training, "[PrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with self.precision.autocast(self.device):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class RunCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer writing atomically through iopath; resumes from ``checkpoint-last.pth``."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: obj.state_dict() for k, obj in self.checkpointables.items()},
                **kwargs}
        path = join(self.save_dir, f"{name}.pth")
        save_torch(path, data, keep_previous=True)
        self.tag_last_checkpoint(os.path.basename(path))
        self.logger.info("saved %s", path)

    def save_weights(self, name: str, iteration: int) -> None:
        """``name`` with the model weights only (what evaluation needs)."""
        if self.save_dir and self.save_to_disk:
            save_torch(join(self.save_dir, name), {"model": self.model.state_dict(), "iteration": iteration})

    def has_checkpoint(self) -> bool:
        return find_checkpoint(self.save_dir) is not None

    def get_checkpoint_file(self) -> str:
        return find_checkpoint(self.save_dir) or ""

    def _load_file(self, filename: str) -> dict[str, Any]:
        if filename.endswith(".pkl"):
            return super()._load_file(filename)
        loaded = load_torch(filename, kind="Detectron2 checkpoint")  # the suite's own files (numpy RNG states...)
        return loaded if isinstance(loaded, dict) and "model" in loaded else {"model": loaded}


class SaveHook(hooks.HookBase):
    """``checkpoint-last.pth`` every ``period`` iterations and after the last; ``model_final.pth`` at the end."""

    def __init__(self, checkpointer: RunCheckpointer, period: int) -> None:
        self.checkpointer, self.period = checkpointer, period

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done >= self.trainer.max_iter:
            self.checkpointer.save(CHECKPOINT.removesuffix(".pth"), iteration=self.trainer.iter)
            self.checkpointer.save_weights(FINAL_WEIGHTS, self.trainer.iter)
        elif self.period > 0 and done % self.period == 0:
            self.checkpointer.save(CHECKPOINT.removesuffix(".pth"), iteration=self.trainer.iter)


class DetTrainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with the changes in the module docstring. ``cfg`` must be adapted to the run
    (:func:`downstream.det.config.adapt_to_run`) and frozen; ``precision`` is the run's choice for its device."""

    def __init__(self, cfg: CfgNode, precision: Precision, stop: StopRequest | None = None) -> None:
        TrainerBase.__init__(self)  # DefaultTrainer.__init__ is replaced: DDP, checkpointer and hooks differ
        self.stop = stop or StopRequest()
        self.cfg, self.start_iter, self.max_iter = cfg, 0, cfg.SOLVER.MAX_ITER
        model = self.build_model(cfg)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = self.build_optimizer(cfg, unwrap(model))
        loader = self.build_train_loader(cfg)
        device = torch.device(cfg.MODEL.DEVICE)
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
        self._trainer = PrecisionTrainer(model, loader, optimizer, precision, device)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = RunCheckpointer(unwrap(model), cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        """Detectron2's model on ``MODEL.DEVICE``."""
        return build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Any:
        """Detectron2's training loader with the suite's mapper (:mod:`.augment`: the config's augmentation)."""
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators: Any = None) -> dict[str, Any]:
        """COCO results of every ``DATASETS.TEST`` entry (of the only one, unnested, if there is one)."""
        results = {name: evaluate_coco(cfg, model, name, join(cfg.OUTPUT_DIR, f"inference/{name}"))
                   for name in cfg.DATASETS.TEST}
        return next(iter(results.values())) if len(results) == 1 else results

    def build_hooks(self) -> list[hooks.HookBase]:
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as Detectron2: precise BN reads a few batches in the main process
        main = comm.is_main_process()

        def evaluate() -> dict[str, Any]:
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        return [h for h in (
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg),
                            cfg.TEST.PRECISE_BN.NUM_ITER) if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model)
            else None,
            SaveHook(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD) if main else None,
            hooks.EvalHook(cfg.TEST.EVAL_PERIOD, evaluate),
            hooks.PeriodicWriter(self.build_writers(), period=LOG_PERIOD) if main else None,
        ) if h is not None]

    def build_writers(self) -> list:
        out = self.cfg.OUTPUT_DIR
        return [CommonMetricPrinter(self.max_iter), JSONWriter(join(out, "metrics.jsonl")),
                TensorboardXWriter(join(out, "tensorboard"))]

    def resume_or_load(self, resume_from: str | None = None, weights: str = "none", trust: bool = False) -> str:
        """Continue from the checkpoint ``resume_from`` or start from ``weights`` (``trust``: unpickle it fully,
        ``--trust-weights``); returns what it did."""
        if resume_from:
            path = resume_from
            self.checkpointer.load(path)
            self.start_iter = self.iter + 1
            return f"resumed from {path} at iteration {self.start_iter}"
        if weights == "none":
            return "no pretrained weights: training from scratch"
        report: WeightsReport = load_detection_weights(self.model, weights, trust=trust)
        return report.describe()

    def _stop_agreed(self) -> bool:
        if comm.get_world_size() == 1:
            return self.stop.requested
        flag = torch.tensor([float(self.stop.requested)], device=self.cfg.MODEL.DEVICE)
        torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)

    def train(self) -> bool:
        """Detectron2's loop from ``start_iter`` to ``max_iter`` with a stop check before each iteration.

        Returns True when every iteration ran (and the final evaluation with it), False after a stop (the
        checkpoint then holds the last finished iteration).
        """
        start, stopped = self.start_iter, False
        logger.info("starting training at iteration %d of %d", start, self.max_iter)
        self.iter = start
        with EventStorage(start) as self.storage:
            try:
                self.before_train()
                for iteration in range(start, self.max_iter):
                    self.iter = iteration
                    if self._stop_agreed():
                        stopped = True
                        self.iter -= 1  # the last finished iteration: no final evaluation in after_train
                        break
                    self.before_step()
                    self.run_step()
                    self.after_step()
                else:
                    self.iter = self.max_iter  # as Detectron2: iter == max_iter marks a finished run
            finally:
                self.after_train()
        if stopped:
            self.checkpointer.save(CHECKPOINT.removesuffix(".pth"), iteration=self.iter)
        return not stopped

    @property
    def last_results(self) -> Mapping[str, Any]:
        """Results of the last evaluation (empty if none ran)."""
        return getattr(self, "_last_eval_results", None) or {}
