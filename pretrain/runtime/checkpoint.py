"""Checkpoint files of every stage: atomic ``torch.save``, one reader with one error type, RNG states and seeding.

``checkpoint-last.pth`` keeps its predecessor as ``checkpoint-last.pth.prev`` and :func:`find_checkpoint`
falls back to it if a crash lands between the two renames of an atomic write (:mod:`.io`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from iopath.common.file_io import PathManager

from .errors import SuiteError
from .io import CHECKPOINT, PREVIOUS_SUFFIX, atomic_write, find_checkpoint

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "capture_rng",
    "find_checkpoint",
    "load_torch",
    "restore_rng",
    "save_torch",
    "seed_everything",
    "seeded_host_rngs",
]

class CheckpointError(SuiteError, RuntimeError):
    """A checkpoint that is missing, cannot be read, or is not the kind of file the caller needs."""


def save_torch(path: str, obj: Any, keep_previous: bool = False, pm: PathManager | None = None) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    atomic_write(path, lambda handle: torch.save(obj, handle), keep_previous=keep_previous, pm=pm)


def load_torch(
    path: str, required: Iterable[str] = (), kind: str = "checkpoint", pm: PathManager | None = None,
    weights_only: bool = False,
) -> Any:
    """``torch.load`` ``path`` on the CPU; :class:`CheckpointError` with one line naming the problem.

    ``required``: keys the loaded dict must have, else it is "not a <kind>". ``weights_only=False`` (the
    default, for the suite's own training checkpoints) unpickles arbitrary objects: only open files you trust.
    """
    pm = pm or PathManager()
    path = str(path)
    if not pm.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with pm.open(path, "rb") as handle:
            loaded = torch.load(handle, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch.load raises many types for damaged or foreign files
        hint = f"; its predecessor {path}{PREVIOUS_SUFFIX} may load (--resume it)" if not path.endswith(
            PREVIOUS_SUFFIX) and pm.exists(path + PREVIOUS_SUFFIX) else ""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}{hint}") from error
    required = sorted(required)
    if required and (not isinstance(loaded, dict) or not set(required) <= loaded.keys()):
        found = sorted(loaded)[:8] if isinstance(loaded, dict) else type(loaded).__name__
        raise CheckpointError(f"{path} is not a {kind}: needs keys {required}, found {found}")
    return loaded


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and (if initialised) the current GPU's random generators.

    Only the current device's CUDA state is read: each rank owns one GPU, and touching the others would
    create a CUDA context on every GPU of the node from every rank.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (the CUDA state goes to the current device)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_host_rngs(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded with ``seed`` inside the block, their previous states
    restored after it (CUDA generators are left alone). Gives a data sample the same random augmentation
    whichever process, worker or position in a resumed epoch draws it."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
