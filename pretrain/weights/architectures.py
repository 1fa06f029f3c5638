"""The timm architectures weights are checked against: key names and shapes, built on the meta device.

:data:`SUITE_ARCHITECTURES` are the models the suite ships recipes for (and the tiny demo's ResNet-18); a file
that names no architecture is matched against them by key names and shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .files import WeightsError

__all__ = ["SUITE_ARCHITECTURES", "Architecture", "architecture", "fit_problems", "key_examples", "match_architecture"]

SUITE_ARCHITECTURES = ("resnet18", "resnet50", "resnet101", "resnet152", "resnet200", "convnext_small",
                       "convnext_base", "convnext_large")
STAGES = 4  # SparK's encoder uses the last four feature stages (strides 4 to 32)
EXAMPLES = 4  # keys named in an error message


def key_examples(keys: Iterable[str]) -> str:
    """The first few of ``keys`` (sorted) and how many more, for one-line messages."""
    keys = sorted(keys)
    more = f" and {len(keys) - EXAMPLES} more" if len(keys) > EXAMPLES else ""
    return ", ".join(keys[:EXAMPLES]) + more


@dataclass(frozen=True)
class Architecture:
    """A timm architecture as weights see it.

    ``shapes``: ``timm.create_model(name, num_classes=0)``'s state dict shapes; ``classifier``: its classifier
    module prefixes (``fc.``, ``head.fc.``); ``tail``: keys after the last feature stage (ConvNeXt's
    ``head.norm``), which SparK never trains and released encoders may lack; ``model``: the meta-device model
    (for checkpoint filters that read its shapes; layers after the last stage pruned).
    """

    name: str
    shapes: Mapping[str, torch.Size]
    classifier: tuple[str, ...]
    tail: tuple[str, ...]
    model: nn.Module

    def is_classifier(self, key: str) -> bool:
        return bool(self.classifier) and key.startswith(self.classifier)


def _tail_keys(model: nn.Module) -> tuple[str, ...]:
    """Keys that :meth:`prune_intermediate_layers` removes after the last four stages (none if unsupported)."""
    before = list(model.state_dict())
    try:
        model.prune_intermediate_layers(STAGES, prune_norm=True, prune_head=True)
    except (AttributeError, NotImplementedError, AssertionError, TypeError):
        return ()
    after = set(model.state_dict())
    return tuple(k for k in before if k not in after)


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module prefixes of a timm model's classifier(s), from its pretrained config (``fc``, ``head.fc``...)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(n + "." for n in ((names,) if isinstance(names, str) else names))


def architecture(name: str) -> Architecture:
    """The :class:`Architecture` of timm ``name``; :class:`WeightsError` for a name timm does not know."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise WeightsError(f"{error}".strip()) from error
    prefixes = classifier_prefixes(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return Architecture(name, shapes, prefixes, _tail_keys(model), model)


def fit_problems(state: Mapping[str, torch.Tensor], arch: Architecture) -> list[str]:
    """What keeps ``state`` from loading into ``arch`` (classifier keys and a missing tail allowed), e.g.
    ``["2 missing (a, b)", "1 of another shape (c (3,) vs (4,))"]``; empty when it fits."""
    missing = [k for k in arch.shapes if k not in state and k not in arch.tail]
    unexpected = [k for k in state if k not in arch.shapes and not arch.is_classifier(k)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(arch.shapes[k])}" for k in state
             if k in arch.shapes and tuple(state[k].shape) != tuple(arch.shapes[k])]
    return [f"{len(keys)} {what} ({key_examples(keys)})" for what, keys in
            (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]


def _stem_present(state: Mapping[str, torch.Tensor], name: str) -> bool:
    """Whether ``state`` has the first convolution of timm ``name`` (from its registry entry, nothing built)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    first = cfg.first_conv if cfg is not None else None
    return not isinstance(first, str) or f"{first}.weight" in state


def match_architecture(state: Mapping[str, torch.Tensor],
                       rename: Callable[[Mapping[str, torch.Tensor], Architecture], Mapping[str, torch.Tensor]],
                       candidates: Iterable[str] = SUITE_ARCHITECTURES, named_as_timm: bool = True) -> str | None:
    """The first of ``candidates`` whose keys and shapes ``state`` (after ``rename``) fits exactly, else None.

    ``named_as_timm``: ``state`` has timm's names already, so candidates whose first convolution it lacks are
    skipped without building them.
    """
    for name in candidates:
        if named_as_timm and not _stem_present(state, name):
            continue
        arch = architecture(name)
        try:
            renamed = rename(state, arch)
        except (KeyError, RuntimeError, ValueError):  # a name filter that needs keys this architecture lacks
            continue
        if not fit_problems(renamed, arch):
            return name
    return None
