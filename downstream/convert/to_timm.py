"""Any weights the reader knows -> a checked timm file, and loading such weights into a timm classifier.

The converted file has the format of ``encoder_timm.pth`` (:func:`pretrain.weights.timm_file_payload`):
``{"state_dict": every key of timm.create_model(model_name), "model_name": str, "meta": {...}}`` with a fresh
classifier (``meta["untrained"]``). It loads strictly into ``timm.create_model(model_name, pretrained=True,
pretrained_cfg_overlay={"file": path})`` (1000 classes) and through ``timm.models.load_checkpoint`` (timm's
``train.py --initial-checkpoint``); timm's ``train.py --pretrained --pretrained-path path --num-classes K`` drops
the classifier. :func:`load_timm_weights` loads any readable file into a timm classifier with only the
classifier missing.

Sources: every layout of :data:`pretrain.weights.LAYOUTS` (this suite's checkpoints and ``encoder_timm.pth``,
timm training checkpoints, Hugging Face folders, the released SparK files, Detectron2 ResNet backbones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from pretrain.runtime.checkpoint import save_torch
from pretrain.weights import ArchitectureMismatch, Weights, WeightsError, read_weights, timm_file_payload
from pretrain.weights.architectures import architecture, classifier_prefixes, key_examples

__all__ = [
    "ConvertError",
    "LoadReport",
    "classifier_prefixes",
    "convert_to_timm",
    "key_examples",
    "load_timm_weights",
    "read_for_model",
    "read_timm_weights",
]

CONVERTER = "python -m downstream.convert timm"


class ConvertError(WeightsError):
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
        return f"loaded {self.loaded} tensors of {self.model_name}; left at initialisation (new classifier): {missing}"


def read_timm_weights(path: str | os.PathLike, model_name: str | None = None, trust: bool = False) -> Weights:
    """:func:`pretrain.weights.read_weights` (kept under the converter's name): timm-named weights of ``path``."""
    return read_weights(path, model_name, trust=trust)


def convert_to_timm(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
                    trust: bool = False) -> dict[str, Any]:
    """Write ``dst`` (the ``encoder_timm.pth`` format) from ``src``, checked key for key against timm.

    ``model_name``: the expected architecture; needed only for a file that names none and matches none of the
    suite's architectures; an error if it differs from the name the source records. A source classifier is
    dropped (listed in ``meta``). Returns what was written.
    """
    weights = read_weights(src, model_name, trust=trust)
    arch = architecture(weights.model_name)
    dropped = sorted(k for k in weights.state_dict if arch.is_classifier(k))
    state = {k: v for k, v in weights.state_dict.items() if k not in dropped}
    meta = {**weights.meta, "converted_from": str(src), "layout": weights.layout, "converter": CONVERTER}
    if dropped:
        meta["dropped_classifier_keys"] = dropped
    payload = timm_file_payload(state, weights.model_name, meta)
    save_torch(str(dst), payload)
    return payload


def read_for_model(source: str | os.PathLike, target: str, trust: bool = False) -> Weights:
    """:func:`~pretrain.weights.read_weights` for a model of architecture ``target`` ("" if unknown); weights of
    another architecture are a :class:`ConvertError` saying "holds X weights; the model is Y"."""
    try:
        return read_weights(source, target or None, trust=trust)
    except ArchitectureMismatch as error:
        raise ConvertError(f"{source} holds {error.found} weights; the model is {error.expected}") from None


def load_timm_weights(model: nn.Module, source: str | os.PathLike | Weights, model_name: str | None = None,
                      trust: bool = False) -> LoadReport:
    """Load timm weights into a timm classifier ``model`` (any ``num_classes``); returns a :class:`LoadReport`.

    Only the classifier (and layers the file lacks after the last stage) may stay at initialisation; another
    architecture (recorded in the weights against ``model_name`` or ``model.pretrained_cfg['architecture']``),
    an unexpected key or a wrong shape raises :class:`ConvertError`. Source classifier keys are dropped.
    """
    target = model_name or getattr(model, "pretrained_cfg", {}).get("architecture") or ""
    weights = source if isinstance(source, Weights) else read_for_model(source, target, trust)
    if target and weights.model_name != target:
        raise ConvertError(f"{weights.path} holds {weights.model_name} weights; the model is {target}")
    prefixes = classifier_prefixes(model)
    state = {k: v for k, v in weights.state_dict.items() if not k.startswith(prefixes)}
    dropped = sorted(set(weights.state_dict) - set(state))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise ConvertError(f"{weights.path} does not fit {target or type(model).__name__}: "
                           f"{' '.join(str(error).split())[:300]}") from error
    undue = [k for k in result.missing_keys if not k.startswith(prefixes) and k not in weights.missing]
    if undue or result.unexpected_keys:
        unexpected = key_examples(result.unexpected_keys) or "none"
        raise ConvertError(f"{weights.path} does not fit {target or type(model).__name__}: missing "
                           f"{key_examples(undue) or 'none'}; unexpected {unexpected}")
    return LoadReport(target or weights.model_name, len(state), tuple(result.missing_keys), tuple(dropped))
