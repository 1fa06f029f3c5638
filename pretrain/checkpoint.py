"""Atomic checkpoint I/O through iopath: the training checkpoint, the timm-format encoder, RNG states.

Every file is written under a temporary name, synced, and renamed into place, so a crash at any moment never
leaves a truncated file under the final name. iopath's ``mv`` does not overwrite, so the old file is moved
aside first: ``checkpoint-last.pth`` keeps its predecessor as ``checkpoint-last.pth.prev`` and
:func:`find_checkpoint` falls back to it if a crash lands between the two renames.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch
from iopath.common.file_io import PathManager

__all__ = [
    "CHECKPOINT",
    "ENCODER",
    "CheckpointError",
    "atomic_write",
    "atomic_write_json",
    "capture_rng",
    "encoder_payload",
    "find_checkpoint",
    "join",
    "load_checkpoint",
    "restore_rng",
    "save_torch",
]

CHECKPOINT = "checkpoint-last.pth"
ENCODER = "encoder_timm.pth"
PREVIOUS_SUFFIX = ".prev"
TMP_SUFFIX = ".tmp"


def join(folder: str, name: str) -> str:
    """``folder/name`` for local paths and URIs alike."""
    return folder.rstrip("/") + "/" + name


def _sync_to_disk(handle: IO) -> None:
    handle.flush()
    with contextlib.suppress(AttributeError, OSError, io.UnsupportedOperation):  # remote handles: no descriptor
        os.fsync(handle.fileno())


def atomic_write(
    path: str, write: Callable[[IO], None], binary: bool = True, keep_previous: bool = False,
    pm: PathManager | None = None,
) -> None:
    """Write ``path`` through ``write(handle)`` on a temporary file, then rename it into place.

    iopath's ``mv`` does not overwrite, so the old file is first moved to ``path + '.prev'``
    (``keep_previous``) or removed; readers of a checkpoint fall back to ``.prev`` if ``path`` is missing.
    """
    pm = pm or PathManager()
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    pm.mkdirs(folder)
    tmp = path + TMP_SUFFIX
    with pm.open(tmp, "wb" if binary else "w") as handle:
        write(handle)
        _sync_to_disk(handle)
    if pm.exists(path):
        if keep_previous:
            previous = path + PREVIOUS_SUFFIX
            if pm.exists(previous):
                pm.rm(previous)
            _move(pm, path, previous)
        else:
            pm.rm(path)
    _move(pm, tmp, path)


def _move(pm: PathManager, src: str, dst: str) -> None:
    if not pm.mv(src, dst):
        raise OSError(f"could not rename {src} to {dst}")


def atomic_write_json(path: str, obj: Any, pm: PathManager | None = None) -> None:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text), binary=False, pm=pm)


def save_torch(path: str, obj: Any, keep_previous: bool = False, pm: PathManager | None = None) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    atomic_write(path, lambda handle: torch.save(obj, handle), keep_previous=keep_previous, pm=pm)


def find_checkpoint(folder: str, pm: PathManager | None = None) -> str | None:
    """``folder/checkpoint-last.pth``, else its ``.prev`` (a crash between the two renames), else None."""
    pm = pm or PathManager()
    last = join(folder, CHECKPOINT)
    for candidate in (last, last + PREVIOUS_SUFFIX):
        if pm.exists(candidate):
            return candidate
    return None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or is not a training checkpoint of this runner."""


def load_checkpoint(path: str, pm: PathManager | None = None) -> dict[str, Any]:
    """Read a training checkpoint written by this runner (a dict with ``model``, ``optimizer``, ``state``...)."""
    pm = pm or PathManager()
    try:
        with pm.open(path, "rb") as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types for damaged files
        hint = f"; its predecessor {path}{PREVIOUS_SUFFIX} may load (--resume it)" if not path.endswith(
            PREVIOUS_SUFFIX) and pm.exists(path + PREVIOUS_SUFFIX) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {error}{hint}") from error
    required = {"model", "optimizer", "state", "rng", "config"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a training checkpoint of python -m pretrain (needs {sorted(required)})")
    return checkpoint


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


def encoder_payload(encoder_state: dict[str, torch.Tensor], model_name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Content of ``encoder_timm.pth``: ``state_dict`` (timm keys) plus ``model_name`` and ``meta``.

    Load with ``timm.create_model(ckpt['model_name'], num_classes=0).load_state_dict(ckpt['state_dict'])``
    (strict), or ``timm.models.load_checkpoint(model, path)``. Only tensors and plain Python values are
    stored, so ``torch.load(..., weights_only=True)`` reads it.
    """
    return {
        "state_dict": {key: value.detach().cpu().clone() for key, value in encoder_state.items()},
        "model_name": model_name,
        "meta": meta,
    }
