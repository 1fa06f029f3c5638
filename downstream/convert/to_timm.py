"""SparK (or any timm) weights -> a checked timm state dict, and loading such weights into a timm classifier.

The converted file has the format of ``encoder_timm.pth``: ``{"state_dict": timm keys without classifier,
"model_name": str, "meta": {...}}``; ``timm.create_model(model_name, num_classes=K)`` loads it with only the
classifier keys missing (:func:`load_timm_weights` does exactly that and reports it; so do
``timm.models.load_checkpoint(model, path, strict=False)`` and
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, num_classes=K)``).

Sources read by :func:`read_timm_weights`: a pretraining ``checkpoint-last.pth``, ``encoder_timm.pth`` (or this
converter's output), a timm training checkpoint (``{"state_dict", "arch"}``) or a plain state dict of tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import EncoderWeights, encoder_payload, read_encoder_weights
from pretrain.runtime.checkpoint import CheckpointError, load_torch, save_torch

__all__ = [
    "ConvertError",
    "LoadReport",
    "classifier_prefixes",
    "key_examples",
    "convert_to_timm",
    "load_timm_weights",
    "read_timm_weights",
    "timm_architecture_keys",
]

EXAMPLES = 4  # keys named in an error message


class ConvertError(CheckpointError):
    """Weights that do not fit the architecture they are converted for or loaded into (one line)."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_timm_weights` loaded: the keys left missing (the classifier) and those dropped."""

    model_name: str
    loaded: int
    missing: tuple[str, ...]
    dropped: tuple[str, ...]  # classifier keys of the source not loaded (the new head replaces them)

    def describe(self) -> str:
        missing = ", ".join(self.missing) or "none"
        return f"loaded {self.loaded} tensors of {self.model_name}; missing (new classifier): {missing}"


def key_examples(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - EXAMPLES} more" if len(keys) > EXAMPLES else ""
    return ", ".join(keys[:EXAMPLES]) + more


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def read_timm_weights(path: str | os.PathLike, model_name: str | None = None) -> EncoderWeights:
    """timm-named weights from any of the sources in the module docstring; ``model_name`` names plain state dicts.

    Raises :class:`~pretrain.runtime.checkpoint.CheckpointError` naming the file if it is missing, truncated, or
    holds none of these.
    """
    path = str(path)
    try:
        return read_encoder_weights(path)
    except CheckpointError as error:
        if error.__cause__ is not None:  # missing or unreadable file: nothing else to try
            raise
        loaded = load_torch(path)
        if isinstance(loaded, Mapping) and _tensor_dict(loaded.get("state_dict")):  # timm train.py checkpoint
            name = model_name or str(loaded.get("arch") or "")
            return EncoderWeights(name, dict(loaded["state_dict"]), {"source": "timm training checkpoint"})
        if _tensor_dict(loaded):
            return EncoderWeights(model_name or "", dict(loaded), {"source": "state dict"})
        raise CheckpointError(f"{error}; nor a timm state dict (a mapping of tensors)") from None


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module prefixes of a timm model's classifier(s), from its pretrained config (``fc``, ``head.fc``...)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(n + "." for n in ((names,) if isinstance(names, str) else names))


def timm_architecture_keys(model_name: str) -> tuple[dict[str, torch.Size], tuple[str, ...]]:
    """Shapes of ``timm.create_model(model_name, num_classes=0)``'s state dict and its classifier prefixes.

    Built on the meta device (no memory, no initialisation). Raises :class:`ConvertError` for an unknown name.
    """
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConvertError(f"{error}".strip()) from error
    return {k: v.shape for k, v in model.state_dict().items()}, classifier_prefixes(model)


def _check_fit(state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], model_name: str,
               source: str, allowed_missing: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConvertError` naming the keys of ``state`` that do not fit ``shapes``."""
    missing = [k for k in shapes if k not in state and not k.startswith(allowed_missing)]
    unexpected = [k for k in state if k not in shapes]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(shapes[k])}" for k in state
             if k in shapes and tuple(state[k].shape) != tuple(shapes[k])]
    problems = [f"{len(keys)} {what} ({key_examples(keys)})" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]
    if problems:
        raise ConvertError(f"{source} does not fit timm {model_name}: " + "; ".join(problems))


def _split_classifier(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...],
                      known: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` without classifier keys the architecture (built without classifier) does not have."""
    dropped = [k for k in state if k.startswith(prefixes) and k not in known] if prefixes else []
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def convert_to_timm(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None) -> dict[str, Any]:
    """Write ``dst`` (the ``encoder_timm.pth`` format) from ``src``, checked key for key against timm.

    ``model_name``: the expected architecture; required for plain state dicts, and an error if it differs from
    the name the source records. Classifier keys of a source classifier are dropped (listed in ``meta``).
    Returns what was written.
    """
    weights = read_timm_weights(src, model_name)
    if model_name and weights.model_name and weights.model_name != model_name:
        raise ConvertError(f"{src} holds {weights.model_name} weights, expected {model_name}")
    name = model_name or weights.model_name
    if not name:
        raise ConvertError(f"{src} is a plain state dict that names no architecture: pass --model NAME")
    shapes, prefixes = timm_architecture_keys(name)
    state, dropped = _split_classifier(weights.state_dict, prefixes, shapes)
    _check_fit(state, shapes, name, str(src))
    meta = {**weights.meta, "converted_from": str(src), "converter": "python -m downstream.convert timm"}
    if dropped:
        meta["dropped_classifier_keys"] = sorted(dropped)
    payload = encoder_payload(state, name, meta)
    save_torch(str(dst), payload)
    return payload


def load_timm_weights(model: nn.Module, source: str | os.PathLike | EncoderWeights,
                      model_name: str | None = None) -> LoadReport:
    """Load timm weights into a timm classifier ``model`` (any ``num_classes``); returns a :class:`LoadReport`.

    Only the classifier may stay missing; an unexpected key, a wrong shape or another architecture (the name
    recorded in the weights against ``model.pretrained_cfg['architecture']`` or ``model_name``) raises
    :class:`ConvertError` naming the keys. Source classifier keys are dropped (the new head replaces them).
    """
    weights = source if isinstance(source, EncoderWeights) else read_timm_weights(source, model_name)
    where = "the given weights" if isinstance(source, EncoderWeights) else str(source)
    target = model_name or getattr(model, "pretrained_cfg", {}).get("architecture") or ""
    if target and weights.model_name and weights.model_name != target:
        raise ConvertError(f"{where} holds {weights.model_name} weights; the model is {target}")
    expected = model.state_dict()
    prefixes = classifier_prefixes(model)
    state, dropped = _split_classifier(weights.state_dict, prefixes, {})
    _check_fit(state, {k: v.shape for k, v in expected.items()}, target or type(model).__name__, where, prefixes)
    missing = model.load_state_dict(state, strict=False).missing_keys
    return LoadReport(target or weights.model_name, len(state), tuple(missing), tuple(sorted(dropped)))
