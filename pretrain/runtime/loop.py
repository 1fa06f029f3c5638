"""The training loop every stage shares: it knows nothing of the task, which it is handed with its hooks.

A stage gives the :class:`Trainer` its :class:`Task` (the loss of one micro-batch), an optimiser, a
``schedule(step)`` that sets the step's learning rate (and weight decay) and returns what to log, and
:class:`Hook` objects that run after each step and epoch (metrics, checkpoints, evaluation, EMA). The loop
owns what every stage needs done the same way: resumable data order, gradient accumulation with DDP,
autocast, agreement of all ranks on the loss and on stopping, non-finite checks, gradient clipping,
progress bars, and stop requests that save a checkpoint and end the epoch early.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import DistEnv, all_reduce_sum
from .precision import Precision
from .runlog import RunLogger
from .signals import StopRequest

__all__ = [
    "Hook",
    "LoopSettings",
    "MetricsHook",
    "NonFiniteError",
    "EpochSaveHook",
    "PeriodicSaveHook",
    "StepResult",
    "Task",
    "TrainState",
    "Trainer",
    "derive_seed",
    "epoch_loader",
]


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf at optimiser step ``step`` (1-based)."""

    def __init__(self, what: str, value: float, step: int) -> None:
        super().__init__(f"{what} is {value} at iteration {step}")
        self.what, self.value, self.step = what, value, step


@dataclass
class TrainState:
    """Position and running totals of a run; saved in every checkpoint. ``extra`` holds a stage's own
    totals (best accuracy, evaluation curve...), plain JSON-like values."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimiser steps completed in the current epoch
    step: int = 0  # optimiser steps completed in total
    images_seen: int = 0
    skipped_images: int = 0
    train_seconds: float = 0.0  # wall time spent in training steps, over all resumptions
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainState:
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


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs (from a stage's resolved config)."""

    epochs: int
    steps_per_epoch: int
    grad_accum_steps: int = 1
    clip_grad: float = 0.0  # 0: no clipping (the norm is still computed and logged)
    seed: int = 0


class Task(Protocol):
    """What a stage trains: ``model`` (DDP-wrapped when several ranks run) and the loss of a micro-batch."""

    model: nn.Module

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training loss of one micro-batch already on the device in the run's memory format.

        ``generator`` is seeded from (seed, epoch, step, micro-batch, rank): the task's own randomness
        (masks, ...) drawn from it is the same after a resume.
        """
        ...


class Hook:
    """Extends the loop (as Detectron2's hooks do): metrics, checkpoints, evaluation, EMA. Every method is
    optional and runs on every rank (hooks that write files do so on the main rank only)."""

    def before_train(self, trainer: Trainer) -> None:
        """Called once before the first step of this process."""

    def after_step(self, trainer: Trainer, result: StepResult, scalars: Mapping[str, float]) -> None:
        """Called after every optimiser step with its agreed result and the schedule's scalars."""

    def after_epoch(self, trainer: Trainer) -> None:
        """Called after an epoch completes (``trainer.state.epoch`` already counts it)."""

    def after_train(self, trainer: Trainer) -> None:
        """Called once when the loop ends, completed, stopped or failed."""


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (e.g. seed, epoch, step, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def epoch_loader(
    dataset: Dataset, sampler: Sampler, batch_size: int, epoch: int, skip_batches: int, workers: int, seed: int,
    env: DistEnv, collate_fn: Callable | None = None,
) -> DataLoader:
    """This rank's batches of ``epoch`` from ``sampler`` (set to the epoch) without the first ``skip_batches``.

    The order depends only on the sampler's seed, the epoch and the rank, and the loader's own generator (not
    the global RNG) seeds its workers, so a resumed run sees exactly the batches the interrupted one had not
    consumed. Incomplete last batches are dropped.
    """
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    indices = list(sampler)[skip_batches * batch_size:]
    return DataLoader(
        dataset, batch_size=batch_size, sampler=indices, drop_last=True, num_workers=workers,
        collate_fn=collate_fn, pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, env.rank)),
    )


@dataclass
class Trainer:
    """Runs epochs of ``task`` with ``optimizer``; ``save(state)`` is called on every rank when a stop request
    needs a checkpoint (the periodic and epoch-end saves are hooks)."""

    task: Task
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], Mapping[str, float]]  # sets the lr (and wd) of step i (0-based); returns them
    settings: LoopSettings
    env: DistEnv
    precision: Precision
    logger: RunLogger
    stop: StopRequest
    save: Callable[..., None]  # save(state, snapshot=False): a Checkpointer's save
    state: TrainState = field(default_factory=TrainState)
    hooks: Sequence[Hook] = ()

    def _micro_batches(self, batches: Iterator) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The next ``grad_accum_steps`` batches on the device, and how many of their images were unreadable."""
        out, skipped = [], 0
        for _ in range(self.settings.grad_accum_steps):
            images, labels, num_skipped = next(batches)
            if images.shape[0] == 0 and self.env.distributed:
                raise RuntimeError(f"every image of a batch on rank {self.env.rank} was unreadable (step "
                                   f"{self.state.step + 1}); ranks cannot skip a step alone: clean the data set")
            images = images.to(self.env.device, non_blocking=True)
            if self.precision.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            out.append((images, labels.to(self.env.device, non_blocking=True)))
            skipped += num_skipped
        return out, skipped

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], skipped: int = 0) -> StepResult:
        """One optimiser step over ``micro_batches`` (gradient accumulation).

        Losses are averaged over the forward passes; with DDP, gradients are only all-reduced on the last one.
        Raises :class:`NonFiniteError` (naming the step) before the update if the loss or the gradient norm of
        any rank is not finite, so the weights stay those of the last good step.
        """
        model, state = self.task.model, self.state
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        images, passes = 0, 0
        for micro, (x, labels) in enumerate(micro_batches):
            if x.shape[0] == 0:  # every image of this batch was unreadable
                continue
            last = micro == len(micro_batches) - 1
            ddp = isinstance(model, DistributedDataParallel)
            sync = contextlib.nullcontext() if last or not ddp else model.no_sync()
            seed = derive_seed(self.settings.seed, state.epoch, state.step, micro, self.env.rank)
            with sync:
                with self.precision.autocast(self.env.device):
                    loss = self.task.loss(x, labels, torch.Generator().manual_seed(seed))
                (loss / len(micro_batches)).backward()
            loss_sum += loss.detach().double()
            images, passes = images + x.shape[0], passes + 1
        flags = loss_sum.new_tensor([passes, images, skipped, self.stop.requested])
        totals = all_reduce_sum(torch.stack([loss_sum, *flags]))
        loss_mean = (totals[0] / totals[1].clamp_min(1)).item()
        if not math.isfinite(loss_mean):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError("the loss", loss_mean, state.step + 1)
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = self.settings.clip_grad if self.settings.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError("the gradient norm", grad_norm, state.step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_mean, int(totals[2]), int(totals[3]), grad_norm, bool(totals[4] > 0))

    def _advance(self, result: StepResult, seconds: float) -> None:
        state = self.state
        state.step += 1
        state.step_in_epoch += 1
        state.images_seen += result.images
        state.skipped_images += result.skipped
        state.epoch_loss_sum += result.loss
        state.epoch_loss_count += 1
        state.train_seconds += seconds

    def train_epoch(self, loader: DataLoader) -> bool:
        """Train the rest of epoch ``state.epoch``; returns True if it stopped early on a stop request
        (after saving a checkpoint)."""
        state, per_epoch = self.state, self.settings.steps_per_epoch
        bar = self.logger.bar(per_epoch, state.step_in_epoch, f"epoch {state.epoch + 1}/{self.settings.epochs}")
        batches = iter(loader)
        try:
            while state.step_in_epoch < per_epoch:
                started = time.perf_counter()
                micro_batches, skipped = self._micro_batches(batches)
                scalars = self.schedule(state.step)
                result = self.step(micro_batches, skipped)
                self._advance(result, time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{scalars.get('lr', 0.0):.2e}", refresh=False)
                for hook in self.hooks:
                    hook.after_step(self, result, scalars)
                if result.stop:
                    self.save(state)
                    return True
        finally:
            bar.close()
        return False

    def end_epoch(self) -> float:
        """Close the epoch in the state and run the hooks' ``after_epoch``; returns the epoch's mean loss."""
        loss = self.state.end_epoch()
        for hook in self.hooks:
            hook.after_epoch(self)
        return loss


@dataclass
class _Window:
    """Totals since the last logging step."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    start: float = field(default_factory=time.perf_counter)


class MetricsHook(Hook):
    """Writes a ``metrics.jsonl`` record (and TensorBoard scalars) every ``every`` steps and at epoch ends:
    mean loss since the last record, the schedule's scalars, gradient norm, throughput and totals."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.window = _Window()

    def before_train(self, trainer: Trainer) -> None:
        self.window = _Window()

    def after_step(self, trainer: Trainer, result: StepResult, scalars: Mapping[str, float]) -> None:
        window, state = self.window, trainer.state
        window.loss_sum, window.steps, window.images = window.loss_sum + result.loss, window.steps + 1, \
            window.images + result.images
        if state.step % self.every and state.step_in_epoch != trainer.settings.steps_per_epoch:
            return
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        trainer.logger.log({
            "epoch": state.epoch, "step": state.step, "step_in_epoch": state.step_in_epoch,
            "loss": window.loss_sum / max(window.steps, 1), **scalars, "grad_norm": result.grad_norm,
            "images_per_s": window.images / elapsed, "images_seen": state.images_seen,
            "skipped_images": state.skipped_images, "time": time.time(),
        })
        self.window = _Window()


class PeriodicSaveHook(Hook):
    """Saves a checkpoint every ``every`` optimiser steps inside an epoch (the epoch end saves separately)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self, trainer: Trainer, result: StepResult, scalars: Mapping[str, float]) -> None:
        state = trainer.state
        if self.every and state.step % self.every == 0 and state.step_in_epoch < trainer.settings.steps_per_epoch \
                and not result.stop:
            trainer.save(state)


class EpochSaveHook(Hook):
    """Saves a checkpoint after every epoch, and a ``checkpoint-epNNNN.pth`` snapshot every ``snapshot_every``
    epochs (0: never). Put it after hooks whose epoch-end results the checkpoint must hold (evaluation)."""

    def __init__(self, snapshot_every: int = 0) -> None:
        self.snapshot_every = snapshot_every

    def after_epoch(self, trainer: Trainer) -> None:
        epoch = trainer.state.epoch
        trainer.save(trainer.state, snapshot=bool(self.snapshot_every) and epoch % self.snapshot_every == 0)
