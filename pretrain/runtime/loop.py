"""The training loop every stage shares: it knows nothing of the task, which it is handed with its hooks.

A stage gives the :class:`Trainer` its :class:`Task` (the loss of one micro-batch), an optimiser, a
``schedule(step)`` that sets the step's learning rate (and weight decay) and returns what to log, its
:class:`EpochData` and :class:`Hook` objects, registered with :meth:`Trainer.register_hooks`, that run before
training, before each epoch, after each step and epoch, and after training (metrics, checkpoints, evaluation,
EMA). :meth:`Trainer.run` owns the run as Detectron2's ``TrainerBase.train`` does: RNG state, ``before_train``,
the epochs, stop requests (checkpoint saved, run ends early), non-finite losses (an error naming the step and the
last good checkpoint), and ``after_train`` in a ``finally``. The loop also owns what every stage needs done the
same way inside an epoch: resumable data order with per-sample augmentation seeds, gradient accumulation with DDP,
autocast, agreement of all ranks on the loss and on stopping, gradient clipping, progress bars.
"""

from __future__ import annotations

import contextlib
import logging
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

from .checkpoint import restore_rng, seed_everything, seeded_host_rngs
from .distributed import DistEnv, all_reduce_sum
from .errors import RunError
from .precision import Precision
from .runlog import RunLogger
from .signals import StopRequest

__all__ = [
    "EpochData",
    "Hook",
    "LoopSettings",
    "MetricsHook",
    "NonFiniteError",
    "EpochSaveHook",
    "PeriodicSaveHook",
    "SampleSeeded",
    "Saver",
    "StepResult",
    "Task",
    "TrainState",
    "Trainer",
    "derive_seed",
    "epoch_loader",
]

logger = logging.getLogger(__name__)


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

    def before_epoch(self, trainer: Trainer) -> None:
        """Called before each epoch (or the rest of a resumed one) starts."""

    def after_step(self, trainer: Trainer, result: StepResult, scalars: Mapping[str, float]) -> None:
        """Called after every optimiser step with its agreed result and the schedule's scalars."""

    def after_epoch(self, trainer: Trainer) -> None:
        """Called after an epoch completes (``trainer.state.epoch`` already counts it)."""

    def after_train(self, trainer: Trainer) -> None:
        """Called once when the loop ends, completed, stopped or failed (``trainer.completed`` says which)."""


class Saver(Protocol):
    """What the trainer needs of a checkpointer: ``save(state, snapshot=False)`` on every rank, the checkpoint's
    ``path`` and the step it last saved or loaded (``saved_step``, None before either)."""

    path: str
    saved_step: int | None

    def save(self, state: TrainState, snapshot: bool = False) -> None: ...


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (e.g. seed, epoch, step, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class SampleSeeded(Dataset):
    """``dataset`` read by ``(position, index)`` pairs: item ``index`` drawn with Python's, NumPy's and torch's
    CPU generators seeded from (``seed``, ``epoch``, ``rank``, ``position``), ``position`` being the sample's place
    in this rank's epoch. Its random augmentation then depends on the run's seed and the sample's place, not on
    the data worker that draws it nor on where a resumed epoch restarts; the caller's generators are left as
    they were."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int, rank: int) -> None:
        self.dataset, self.seed, self.epoch, self.rank = dataset, seed, epoch, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        position, index = item
        with seeded_host_rngs(derive_seed(self.seed, self.epoch, self.rank, position)):
            return self.dataset[index]


@dataclass(frozen=True)
class EpochData:
    """A stage's training data: ``dataset``, the ``sampler`` that orders an epoch (``set_epoch`` reshuffles),
    per-rank ``batch_size``, loader ``workers``, the run's ``seed`` and the ``collate_fn`` of its batches."""

    dataset: Dataset
    sampler: Sampler
    batch_size: int
    workers: int
    seed: int
    collate_fn: Callable | None = None


def epoch_loader(data: EpochData, epoch: int, skip_batches: int, env: DistEnv) -> DataLoader:
    """This rank's batches of ``epoch`` from ``data.sampler`` (set to the epoch) without the first ``skip_batches``.

    The order depends only on the sampler's seed, the epoch and the rank, and each sample's augmentation only on
    (seed, epoch, rank, its position in the epoch) (:class:`SampleSeeded`): a resumed run sees exactly the
    batches, augmented alike, that the interrupted one had not consumed, whatever the number of data workers.
    Incomplete last batches are dropped.
    """
    if hasattr(data.sampler, "set_epoch"):
        data.sampler.set_epoch(epoch)
    order = list(enumerate(data.sampler))[skip_batches * data.batch_size:]
    return DataLoader(
        SampleSeeded(data.dataset, data.seed, epoch, env.rank), batch_size=data.batch_size, sampler=order,
        drop_last=True, num_workers=data.workers, collate_fn=data.collate_fn, pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed(data.seed, epoch, env.rank)),
    )


@dataclass
class Trainer:
    """Runs the epochs of ``task`` on ``data`` with ``optimizer`` (:meth:`run`); ``checkpointer.save(state)`` is
    called on every rank when a stop request needs a checkpoint (the periodic and epoch-end saves are hooks)."""

    task: Task
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], Mapping[str, float]]  # sets the lr (and wd) of step i (0-based); returns them
    settings: LoopSettings
    env: DistEnv
    precision: Precision
    logger: RunLogger
    stop: StopRequest
    checkpointer: Saver
    data: EpochData | None = None  # needed by :meth:`run` (not by :meth:`step`)
    state: TrainState = field(default_factory=TrainState)
    hooks: list[Hook] = field(default_factory=list)
    completed: bool = False  # every epoch ran (set by :meth:`run`)

    def register_hooks(self, hooks: Sequence[Hook | None]) -> None:
        """Append ``hooks`` (None entries skipped); they run in registration order."""
        self.hooks.extend(h for h in hooks if h is not None)

    def save(self, state: TrainState, snapshot: bool = False) -> None:
        """Write the run's checkpoint at ``state`` (every rank calls it)."""
        self.checkpointer.save(state, snapshot=snapshot)

    def run(self, rng: Any = None) -> bool:
        """Train the epochs left; True when all ran, False when a stop request ended the run (checkpoint saved).

        ``rng``: this rank's RNG states from the checkpoint resumed (None: a fresh run, or another number of ranks,
        seeded from (seed, step, rank)). ``before_train``, then per epoch ``before_epoch``, the steps, the epoch's
        end (``after_epoch``); ``after_train`` always runs last. A non-finite loss or gradient norm raises
        :class:`RunError` naming the step and the checkpoint kept.
        """
        state = self.state
        if self.data is None:
            raise ValueError("Trainer.run needs the stage's EpochData")
        if rng is not None:
            restore_rng(rng)
        else:
            seed_everything(derive_seed(self.settings.seed, state.step, self.env.rank))
        try:
            for hook in self.hooks:
                hook.before_train(self)
            while state.epoch < self.settings.epochs:
                for hook in self.hooks:
                    hook.before_epoch(self)
                loader = epoch_loader(self.data, state.epoch, state.step_in_epoch * self.settings.grad_accum_steps,
                                      self.env)
                if self.train_epoch(loader):
                    return False
                epoch = state.epoch
                logger.info("epoch %d/%d: mean training loss %.4f", epoch + 1, self.settings.epochs, self.end_epoch())
            self.completed = True
            return True
        except NonFiniteError as error:
            saved = self.checkpointer.saved_step
            kept = (f"the last good checkpoint is {self.checkpointer.path} (iteration {saved})" if saved is not None
                    else "no checkpoint had been saved yet")
            raise RunError(f"{error} (epoch {state.epoch + 1}); stopped without saving: {kept}") from error
        finally:
            for hook in self.hooks:
                hook.after_train(self)

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
