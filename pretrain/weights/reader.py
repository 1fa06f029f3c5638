"""The one weights reader: read a file once, identify its layout, settle the architecture, check the keys.

``read_weights(path, model=None)`` returns :class:`Weights`: the encoder's timm state dict (plus a trained
classifier where the file has one), SparK's decoder where present, the model name, and what was found. Every entry
point that takes weights (``downstream.convert``, ``downstream.cls --weights``, ``downstream.det.train --weights``,
``pretrain.visualize --weights``) reads through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import SUITE_ARCHITECTURES, Architecture, architecture, fit_problems, match_architecture
from .detectron2 import DETECTRON2_MODEL, DETECTRON2_PICKLE, detectron2_resnet_to_timm
from .files import ArchitectureMismatch, WeightsError, read_file
from .layout import Found, Layout
from .released import CONVNEXT_OFFICIAL, SPARK_STYLE, WRAPPED, official_convnext_to_timm
from .suite import ENCODER_FILE, FINETUNING, PRETRAINING
from .timm_layouts import HUB_FOLDER, STATE_DICT, TIMM_CHECKPOINT

__all__ = ["LAYOUTS", "Weights", "identify_layout", "read_weights", "to_timm_names"]

logger = logging.getLogger(__name__)
# Tried in order; the first whose predicate holds reads the file (wrapped and plain state dicts come last).
LAYOUTS: tuple[Layout, ...] = (PRETRAINING, FINETUNING, ENCODER_FILE, TIMM_CHECKPOINT, HUB_FOLDER, SPARK_STYLE,
                               DETECTRON2_MODEL, DETECTRON2_PICKLE, WRAPPED, CONVNEXT_OFFICIAL, STATE_DICT)
FOUND_KEYS = 6  # keys named when a file fits no layout
NAMING_FAMILIES = {"convnext-official": "convnext", "detectron2-resnet": "resnet"}  # names that imply a family


@dataclass(frozen=True)
class Weights:
    """What a weights file holds, in timm's names.

    ``state_dict``: the encoder (timm keys of ``timm.create_model(model_name)``) plus the classifier where the
    file has a trained one; keys the file marks untrained are left out. ``missing``: keys after the last stage
    the file lacks (ConvNeXt's ``head.norm`` in released files), which stay at their initialisation.
    ``decoder``/``spark``: SparK's decoder and densify layers (this suite's names) and the
    :func:`~pretrain.spark.build_spark` arguments, where the file has them. ``variants``: other state dicts of the
    model (EMAs). ``detectron2``: the checkpoint of a Detectron2 file as ``DetectionCheckpointer`` loads it
    (only with ``read_weights(..., detectron2=True)``).
    """

    path: str
    layout: str
    model_name: str
    state_dict: dict[str, torch.Tensor]
    missing: tuple[str, ...] = ()
    decoder: dict[str, torch.Tensor] | None = None
    spark: dict[str, Any] | None = None
    variants: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    detectron2: dict[str, Any] | None = None

    def describe(self) -> str:
        """One line: the layout, the architecture and what the file holds."""
        parts = [f"{len(self.state_dict)} tensors of timm {self.model_name or '?'}"]
        if self.decoder:
            parts.append(f"SparK decoder ({len(self.decoder)} tensors)")
        if self.variants:
            parts.append("variants " + ", ".join(self.variants))
        if self.missing:
            parts.append(f"without {', '.join(self.missing)} (left at initialisation)")
        return f"{self.path}: {self.layout} layout, " + "; ".join(parts)


def identify_layout(obj: Any) -> Layout | None:
    """The first layout of :data:`LAYOUTS` that recognises ``obj`` (a loaded file), or None."""
    return next((layout for layout in LAYOUTS if layout.matches(obj)), None)


def _found_keys(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:FOUND_KEYS]]
        return f"keys {', '.join(keys)}{' ...' if len(obj) > FOUND_KEYS else ''}" if keys else "an empty mapping"
    return f"a {type(obj).__name__}"


def _unknown(path: str, obj: Any) -> WeightsError:
    accepted = "; ".join(layout.name for layout in LAYOUTS)
    return WeightsError(f"{path} has no known weights layout (found {_found_keys(obj)}); accepted: {accepted}")


def to_timm_names(state: Mapping[str, torch.Tensor], naming: str, arch: Architecture) -> dict[str, torch.Tensor]:
    """``state`` in ``naming`` (see :data:`~pretrain.weights.layout.NAMINGS`) renamed to timm's keys for ``arch``."""
    if naming == "convnext-official":
        return official_convnext_to_timm(state, arch)
    if naming == "detectron2-resnet":
        return detectron2_resnet_to_timm(state)
    return dict(state)


def _trained(found: Found) -> dict[str, torch.Tensor]:
    return {k: v for k, v in found.state_dict.items() if k not in found.untrained}


def _match(found: Found, candidates: tuple[str, ...] = SUITE_ARCHITECTURES) -> str | None:
    """The suite architecture ``found``'s keys and shapes fit (a naming other than timm's names its family)."""
    family = NAMING_FAMILIES.get(found.naming)
    candidates = tuple(name for name in candidates if family is None or name.startswith(family))
    return match_architecture(_trained(found), lambda s, arch: to_timm_names(s, found.naming, arch), candidates,
                              named_as_timm=found.naming == "timm")


def _model_name(path: str, layout: Layout, found: Found, model: str | None) -> str:
    """The architecture: the file's own name (checked against ``model``), else ``model``, else matched by keys."""
    if found.model_name and model and found.model_name != model:
        raise ArchitectureMismatch(path, found.model_name, model)
    if found.model_name or model:
        return found.model_name or model
    if not found.state_dict:
        raise WeightsError(f"{path} ({layout.name}) holds no backbone in timm's or a Detectron2 ResNet's names")
    matched = _match(found)
    if matched is None:
        raise WeightsError(f"{path} ({layout.name}; its keys and shapes match none of {', '.join(SUITE_ARCHITECTURES)})"
                           " names no architecture: pass --model NAME")
    return matched


def _misfit(path: str, layout: Layout, found: Found, name: str, problems: list[str]) -> WeightsError:
    matched = _match(found, tuple(n for n in SUITE_ARCHITECTURES if n != name))
    hint = f"; its keys and shapes match timm {matched}" if matched else ""
    return WeightsError(f"{path} ({layout.name}) does not fit timm {name}: " + "; ".join(problems) + hint)


def read_weights(path: str | os.PathLike, model: str | None = None, *, trust: bool = False,
                 detectron2: bool = False) -> Weights:
    """Read ``path`` once (never running its code unless ``trust``), identify its layout and log it.

    ``model``: the expected timm architecture; required only for a file that names none and whose keys match
    none of :data:`~pretrain.weights.architectures.SUITE_ARCHITECTURES`; an error if the file names another.
    ``detectron2``: a Detectron2 file comes back as it is (:attr:`Weights.detectron2`), for detection.
    Raises :class:`WeightsError` (one line) for a missing, unreadable or unsafe file, one of no known layout
    (naming a few of its keys and the layouts accepted), or weights that do not fit the architecture.
    """
    path = str(path)
    loaded = read_file(path, trust)
    layout = identify_layout(loaded)
    if layout is None:
        raise _unknown(path, loaded)
    found = layout.read(loaded)
    if detectron2 and found.detectron2 is not None:
        weights = Weights(path, layout.name, found.model_name or "", found.state_dict, meta=found.meta,
                          detectron2=found.detectron2)
        logger.info("%s", weights.describe())
        return weights
    name = _model_name(path, layout, found, model)
    arch = architecture(name)
    try:
        state = to_timm_names(_trained(found), found.naming, arch)
        variants = {key: to_timm_names(value, found.naming, arch) for key, value in found.variants.items()}
    except (KeyError, RuntimeError, ValueError) as error:  # a name filter meeting keys of another architecture
        raise WeightsError(f"{path} ({layout.name}) does not fit timm {name}: {error}") from error
    problems = fit_problems(state, arch)
    if problems:
        raise _misfit(path, layout, found, name, problems)
    weights = Weights(path, layout.name, name, state, tuple(k for k in arch.tail if k not in state), found.decoder,
                      found.spark, variants, found.meta)
    logger.info("%s", weights.describe())
    return weights
