"""Reading a weights file without running its code.

``torch.load(weights_only=True)`` unpickles tensors, containers and plain values only; :data:`SAFE_GLOBALS` adds
the few other classes the accepted layouts hold (``argparse.Namespace``: the ``args`` of timm training
checkpoints; numpy arrays and dtypes: RNG states in this suite's checkpoints). Detectron2 pickles (``.pkl``) go
through :class:`NumpyUnpickler`, which builds numpy arrays and builtin containers and nothing else. A Hugging Face
folder (``config.json`` + ``model.safetensors``) and ``.safetensors`` files hold no code at all. A file that would
need any other class is refused, naming the classes and :data:`TRUST_FLAG`; ``trust=True`` unpickles it fully.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..runtime.checkpoint import CheckpointError
from . import TRUST_FLAG

__all__ = ["HUB_CONFIG", "ArchitectureMismatch", "HubFolder", "NumpyUnpickler", "WeightsError", "read_file"]

HUB_CONFIG = "config.json"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's preferred names in a Hub folder, first found
PICKLE_SUFFIXES = (".pkl", ".pickle")
_NUMPY_DTYPES = tuple(type(np.dtype(code)) for code in "?bhilqBHILQefdgFD")
# (object, name under which a pickle refers to it); numpy < 2 wrote numpy.core, numpy 2 writes numpy._core.
SAFE_GLOBALS: tuple[tuple[Any, str], ...] = (
    (argparse.Namespace, "argparse.Namespace"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
    (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np._core.numeric._frombuffer, "numpy._core.numeric._frombuffer"),  # arrays pickled with protocol 5
    (np._core.numeric._frombuffer, "numpy.core.numeric._frombuffer"),
    *((dtype, f"numpy.dtypes.{dtype.__name__}") for dtype in _NUMPY_DTYPES),
)
# What a Detectron2 pickle may name besides SAFE_GLOBALS' numpy entries: builtin containers and bytes decoding.
_PICKLE_BUILTINS: dict[tuple[str, str], Any] = {
    **{("builtins", name): getattr(builtins, name) for name in ("set", "frozenset", "complex", "slice", "bytearray")},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,
}


class WeightsError(CheckpointError):
    """A weights file that is missing, unreadable, unsafe to read, of no known layout or of another architecture."""


class ArchitectureMismatch(WeightsError):
    """Weights that name one architecture where another is expected (``found`` and ``expected`` timm names)."""

    def __init__(self, path: str, found: str, expected: str) -> None:
        super().__init__(f"{path} holds {found} weights, expected {expected}")
        self.path, self.found, self.expected = path, found, expected


@dataclass(frozen=True)
class HubFolder:
    """A Hugging Face Hub model folder for timm: its ``config.json`` and the state dict of its weights file."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numpy scalars and builtin containers; any other class or function is refused."""

    _allowed = {tuple(name.rsplit(".", 1)): obj for obj, name in SAFE_GLOBALS if name.startswith("numpy")}

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name), _PICKLE_BUILTINS.get((module, name)))
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refusal(path: str, needed: list[str]) -> WeightsError:
    named = ", ".join(sorted(set(needed))[:4]) or "objects other than tensors and plain values"
    return WeightsError(f"{path} needs {named} to be unpickled, which can run code from the file: refused; "
                        f"pass {TRUST_FLAG} if you trust where it comes from")


def _unsafe_globals(path: str, error: BaseException) -> list[str]:
    """The classes a refused torch file names (torch lists them for zip files; else from the error text)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be listed
        found = []
    allowed = {name for _, name in SAFE_GLOBALS}
    found = [name for name in found if name not in allowed]
    if not found and "GLOBAL " in str(error):
        found = [str(error).split("GLOBAL ", 1)[1].split()[0]]
    return found


def _weights_only_reason(error: BaseException) -> str:
    """The line of a weights-only refusal that names its cause (torch's message opens with general advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Unsupported", "Trying to load")):
            return line
    return lines[-1] if lines else type(error).__name__


def _read_torch(path: str, trust: bool) -> Any:
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if trust:
            raise WeightsError(f"cannot read checkpoint {path}: {_first_line(error)}") from error
        if "GLOBAL " in str(error):
            raise _refusal(path, _unsafe_globals(path, error)) from None
        raise WeightsError(f"cannot read checkpoint {path}: {_weights_only_reason(error)} (read without running code; "
                           f"{TRUST_FLAG} reads it fully, if you trust where it comes from)") from None
    except Exception as error:  # torch.load raises many types for damaged or foreign files
        raise WeightsError(f"cannot read checkpoint {path}: {_first_line(error)}") from error


def _read_pickle(path: str, trust: bool) -> Any:
    try:
        with open(path, "rb") as handle:
            if trust:
                return pickle.load(handle, encoding="latin1")
            return NumpyUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise _refusal(path, [str(error).split("GLOBAL ", 1)[1]]) from None
        raise WeightsError(f"cannot read checkpoint {path}: {_first_line(error)}") from error
    except Exception as error:  # EOFError for a truncated file, and the like
        raise WeightsError(f"cannot read checkpoint {path}: {_first_line(error)}") from error


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise WeightsError(f"cannot read checkpoint {path}: {_first_line(error)}") from error


def _read_hub_folder(path: str, trust: bool) -> HubFolder:
    config_path = os.path.join(path, HUB_CONFIG)
    if not os.path.isfile(config_path):
        raise WeightsError(f"{path} is a folder without {HUB_CONFIG}: not a Hugging Face model folder")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read {config_path}: {_first_line(error)}") from error
    for name in HUB_WEIGHTS:
        weights = os.path.join(path, name)
        if os.path.isfile(weights):
            state = _read_safetensors(weights) if name.endswith(".safetensors") else _read_torch(weights, trust)
            return HubFolder(config if isinstance(config, dict) else {}, state)
    raise WeightsError(f"{path} holds {HUB_CONFIG} but no weights file ({', '.join(HUB_WEIGHTS)})")


def read_file(path: str | os.PathLike, trust: bool = False) -> Any:
    """The content of a weights file (or Hub folder) on the CPU, read without running code unless ``trust``.

    Raises :class:`WeightsError` in one line for a missing, unreadable or truncated file, and for one that
    would need arbitrary classes to be unpickled (naming them and :data:`TRUST_FLAG`).
    """
    path = str(path)
    if not os.path.exists(path):
        raise WeightsError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        return _read_hub_folder(path, trust)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return _read_pickle(path, trust)
    return _read_torch(path, trust)
