"""Saving and restoring a run exactly: weights, optimiser, position, RNG states of every rank, config.

``checkpoint-last.pth`` is ``{<name>: state_dict() of each saved object ("model", "optimizer", ...),
"state": TrainState, "epoch", "iteration", "scheduler": {"step", "steps_per_epoch", "total_steps"},
"rng": [per-rank RNG states], "config": resolved config, "world_size", **extra}``. Every rank calls
:meth:`Checkpointer.save` (the RNG states are gathered); the main rank writes, atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from iopath.common.file_io import PathManager

from .checkpoint import CHECKPOINT, CheckpointError, capture_rng, load_torch, save_torch
from .distributed import DistEnv, all_gather_objects, barrier
from .errors import SuiteError
from .io import join
from .loop import TrainState

__all__ = ["Checkpointer", "IncompatibleCheckpoint", "Stateful"]

logger = logging.getLogger(__name__)
REQUIRED = ("state", "rng", "config")


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` (modules, optimisers, EMA wrappers)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class IncompatibleCheckpoint(SuiteError):
    """A checkpoint whose config differs from this run's in a setting that shapes the saved state."""


@dataclass
class Checkpointer:
    """Writes and reads ``OUT/checkpoint-last.pth`` for one run.

    ``objects``: the saved state, by name. ``config``: the resolved config stored with it; ``compat_keys``
    are the config entries a resumed run must share with its checkpoint. ``extra(state)`` adds stage entries
    to the payload; ``also_write(state, payload)`` writes companion files on the main rank (e.g. SparK's
    ``encoder_timm.pth``).
    """

    out: str
    env: DistEnv
    objects: Mapping[str, Stateful]
    config: Mapping[str, Any]
    steps_per_epoch: int
    total_steps: int
    compat_keys: Sequence[str] = ()
    kind: str = "training checkpoint"
    extra: Callable[[TrainState], Mapping[str, Any]] = lambda state: {}
    also_write: Callable[[TrainState, Mapping[str, Any]], None] = lambda state, payload: None
    pm: PathManager = field(default_factory=PathManager)
    saved_step: int | None = None  # the step of the last checkpoint written or read

    @property
    def path(self) -> str:
        return join(self.out, CHECKPOINT)

    def payload(self, state: TrainState, rng: list[Any]) -> dict[str, Any]:
        """The checkpoint's content at ``state`` (``rng``: every rank's RNG states, in rank order)."""
        payload = {name: obj.state_dict() for name, obj in self.objects.items()}
        payload.update({
            "scheduler": {"step": state.step, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps},
            "state": state.to_dict(), "epoch": state.epoch, "iteration": state.step, "rng": rng,
            "config": dict(self.config), "world_size": self.env.world_size, **self.extra(state),
        })
        return payload

    def save(self, state: TrainState, snapshot: bool = False) -> None:
        """Write ``checkpoint-last.pth`` (keeping the previous one as ``.prev``), and with ``snapshot`` also
        ``checkpoint-epNNNN.pth``. Every rank must call this."""
        rng = all_gather_objects(capture_rng())
        if self.env.is_main:
            payload = self.payload(state, rng)
            save_torch(self.path, payload, keep_previous=True, pm=self.pm)
            self.also_write(state, payload)
            if snapshot:
                save_torch(join(self.out, f"checkpoint-ep{state.epoch:04d}.pth"), payload, pm=self.pm)
        barrier()
        self.saved_step = state.step

    def load(self, path: str) -> tuple[TrainState, Any]:
        """Restore every object and the position from ``path``; returns the state and this rank's RNG states
        (None when the checkpoint came from another number of ranks).

        Raises :class:`CheckpointError` for unreadable files and :class:`IncompatibleCheckpoint` when a
        ``compat_keys`` setting changed.
        """
        checkpoint = load_torch(path, (*REQUIRED, *self.objects), self.kind, self.pm)
        saved = checkpoint["config"]
        changed = [key for key in self.compat_keys if saved.get(key) != self.config.get(key)]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {self.config.get(k)!r}" for k in changed)
            raise IncompatibleCheckpoint(f"cannot resume {path}: the config changed ({details})")
        for name, obj in self.objects.items():
            try:
                obj.load_state_dict(checkpoint[name])
            except (RuntimeError, ValueError, KeyError) as error:
                raise CheckpointError(f"cannot restore {name} from {path}: {str(error).splitlines()[0]}") from error
        state = TrainState.from_dict(checkpoint["state"])
        saved_per_epoch = checkpoint["scheduler"]["steps_per_epoch"]
        if saved_per_epoch != self.steps_per_epoch and state.step_in_epoch:
            logger.warning("steps per epoch changed (%d -> %d): epoch %d continues at step %d of the new order",
                           saved_per_epoch, self.steps_per_epoch, state.epoch + 1,
                           min(state.step_in_epoch, self.steps_per_epoch))
            state.step_in_epoch = min(state.step_in_epoch, self.steps_per_epoch)
        self.saved_step = state.step
        logger.info("resumed from %s: epoch %d, iteration %d", path, state.epoch + 1, state.step)
        rng = checkpoint["rng"]
        return state, rng[self.env.rank] if len(rng) == self.env.world_size else None
