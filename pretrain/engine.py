"""The per-epoch training loop: resumable data order, per-step masks, gradient accumulation, logging, saving."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .amp import autocast_for
from .config import PretrainConfig
from .data import collate_skip_corrupt
from .distributed import DistEnv, all_reduce_sum
from .logging_utils import RunLogger
from .optim import Schedule
from .runtime.signals import StopRequest

__all__ = [
    "Engine",
    "NonFiniteError",
    "StepResult",
    "TrainState",
    "derive_seed",
    "epoch_loader",
    "steps_per_epoch",
    "train_step",
]


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf at optimiser step ``step`` (1-based)."""

    def __init__(self, what: str, value: float, step: int) -> None:
        super().__init__(f"{what} is {value} at iteration {step}")
        self.what, self.value, self.step = what, value, step


@dataclass
class TrainState:
    """Position and running totals of a run; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimiser steps completed in the current epoch
    step: int = 0  # optimiser steps completed in total
    images_seen: int = 0
    skipped_images: int = 0
    train_seconds: float = 0.0  # wall time spent in training steps, over all resumptions
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        return cls(**values)

    def end_epoch(self) -> float:
        """Close the current epoch; returns its mean loss."""
        mean = self.epoch_loss_sum / max(self.epoch_loss_count, 1)
        self.epoch_losses.append(mean)
        self.epoch, self.step_in_epoch, self.epoch_loss_sum, self.epoch_loss_count = self.epoch + 1, 0, 0.0, 0
        return mean


@dataclass(frozen=True)
class StepResult:
    """Outcome of one optimiser step, agreed over all ranks."""

    loss: float  # mean loss over the forward passes of all ranks
    images: int  # images of all ranks
    skipped: int  # unreadable images of all ranks
    grad_norm: float
    stop: bool  # some rank was asked to stop


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (e.g. seed, epoch, step, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def steps_per_epoch(num_images: int, cfg: PretrainConfig) -> int:
    """Optimiser steps per epoch: each rank's share of whole batches, grouped by ``grad_accum_steps``."""
    return num_images // cfg.world_size // cfg.batch_size // cfg.grad_accum_steps


def epoch_loader(dataset: Dataset, cfg: PretrainConfig, env: DistEnv, epoch: int, skip_batches: int) -> DataLoader:
    """This rank's batches of ``epoch`` (a fixed permutation per epoch) without the first ``skip_batches``.

    The order depends only on (seed, epoch, rank), and the loader's own generator (not the global RNG)
    seeds its workers, so a resumed run sees exactly the batches the interrupted one had not consumed.
    """
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)[skip_batches * cfg.batch_size:]
    return DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=indices, drop_last=True, num_workers=cfg.workers,
        collate_fn=collate_skip_corrupt, pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, env.rank)),
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: PretrainConfig,
    step: int,
    skipped: int = 0,
    stop_requested: bool = False,
) -> StepResult:
    """One optimiser step over ``batches`` of ``(images, active mask)`` (gradient accumulation).

    Losses are averaged over the forward passes; with DDP, gradients are only all-reduced on the last one.
    Raises :class:`NonFiniteError` (naming ``step``) before the update if the loss or the gradient norm of
    any rank is not finite, so the weights stay those of the last good step.
    """
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images, passes = 0, 0
    for index, (x, active) in enumerate(batches):
        if x.shape[0] == 0:  # every image of this batch was unreadable
            continue
        last = index == len(batches) - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with autocast_for(device, cfg.amp):
                loss = model(x, active)
            (loss / len(batches)).backward()
        loss_sum += loss.detach().double()
        images, passes = images + x.shape[0], passes + 1
    totals = all_reduce_sum(torch.stack([loss_sum, *loss_sum.new_tensor([passes, images, skipped, stop_requested])]))
    loss_mean = (totals[0] / totals[1].clamp_min(1)).item()
    if not math.isfinite(loss_mean):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError("the loss", loss_mean, step)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError("the gradient norm", grad_norm, step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_mean, int(totals[2]), int(totals[3]), grad_norm, bool(totals[4] > 0))


@dataclass
class _Window:
    """Totals since the last logging step."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        self.loss_sum += result.loss
        self.steps += 1
        self.images += result.images

    def record(self, state: TrainState, lr: float, wd: float, result: StepResult) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
            "loss": self.loss_sum / max(self.steps, 1), "lr": lr, "weight_decay": wd,
            "grad_norm": result.grad_norm, "images_per_s": self.images / elapsed,
            "images_seen": state.images_seen, "skipped_images": state.skipped_images, "time": time.time(),
        }


@dataclass
class Engine:
    """Everything one epoch of training needs; ``save(state)`` is called on every rank when a checkpoint is due."""

    model: nn.Module  # possibly DDP-wrapped
    mask: Callable[[int, torch.Generator], torch.Tensor]  # (batch, generator) -> bool mask on the device
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    cfg: PretrainConfig
    env: DistEnv
    logger: RunLogger
    stop: StopRequest
    save: Callable[[TrainState], None]
    steps_per_epoch: int

    def _batches(self, batches: Iterator, state: TrainState) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The next ``grad_accum_steps`` batches on the device with their masks, and the unreadable count."""
        out, skipped = [], 0
        for micro in range(self.cfg.grad_accum_steps):
            images, _, num_skipped = next(batches)
            if images.shape[0] == 0 and self.env.distributed:
                raise RuntimeError(f"every image of a batch on rank {self.env.rank} was unreadable (step "
                                   f"{state.step + 1}); ranks cannot skip a step alone: clean the data set")
            images = images.to(self.env.device, non_blocking=True)
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            seed = derive_seed(self.cfg.seed, state.epoch, state.step, micro, self.env.rank)
            out.append((images, self.mask(images.shape[0], torch.Generator().manual_seed(seed))))
            skipped += num_skipped
        return out, skipped

    def train_one_epoch(self, loader: DataLoader, state: TrainState) -> bool:
        """Train the rest of epoch ``state.epoch``; returns True if it stopped early on a stop request."""
        bar = self.logger.bar(self.steps_per_epoch, state.step_in_epoch, f"epoch {state.epoch + 1}/{self.cfg.epochs}")
        batches, window = iter(loader), _Window()
        try:
            while state.step_in_epoch < self.steps_per_epoch:
                started = time.perf_counter()
                pairs, skipped = self._batches(batches, state)
                lr, wd = self.schedule.apply(state.step)
                result = train_step(self.model, self.optimizer, pairs, self.cfg, state.step + 1, skipped,
                                    self.stop.requested)
                self._advance(state, result)
                state.train_seconds += time.perf_counter() - started
                window.add(result)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if state.step % self.cfg.log_every == 0 or state.step_in_epoch == self.steps_per_epoch:
                    self.logger.log(window.record(state, lr, wd, result))
                    window = _Window()
                if result.stop:
                    self.save(state)
                    return True
                if self.cfg.save_every and state.step % self.cfg.save_every == 0 \
                        and state.step_in_epoch < self.steps_per_epoch:
                    self.save(state)
        finally:
            bar.close()
        return False

    @staticmethod
    def _advance(state: TrainState, result: StepResult) -> None:
        state.step += 1
        state.step_in_epoch += 1
        state.images_seen += result.images
        state.skipped_images += result.skipped
        state.epoch_loss_sum += result.loss
        state.epoch_loss_count += 1
