"""Loading weights into a Detectron2 model: pretrained backbones to start from, trained models to evaluate.

Every file is read by :func:`pretrain.weights.read_weights` (never running its code, unless ``trust``):

- a Detectron2 ``.pkl`` (``python -m downstream.convert detectron2``, or any Detectron2-format pickle) or a
  Detectron2 ``.pth`` whose ``model`` holds full model names (``backbone.*``, ``roi_heads.*``: a trained model
  such as ``model_final.pth``): loaded by ``DetectionCheckpointer`` (with its name-matching heuristics for
  pickles);
- every other layout the reader knows (``checkpoint-last.pth`` of pretraining, ``encoder_timm.pth``, a timm
  checkpoint, the released SparK files...): its timm encoder put under the backbone, timm names for the timm
  backbone, renamed for Detectron2's ResNet.

Every load is checked: a backbone key left missing, a key the model does not have, or a shape that differs is an
error naming the keys (when evaluating, any missing key is); heads missing when starting from a backbone are
expected and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.weights import ArchitectureMismatch, Weights, read_weights
from pretrain.weights.detectron2 import resnet_depth

from ..convert.to_detectron2 import rename_resnet
from ..convert.to_timm import ConvertError, classifier_prefixes, key_examples
from .backbone import TimmBackbone

__all__ = ["BACKBONE_PREFIX", "WeightsReport", "load_detection_weights", "unwrap"]

BACKBONE_PREFIX = "backbone.bottom_up."


@dataclass(frozen=True)
class WeightsReport:
    """What a load did: the file and its kind, tensors loaded, and the model keys left at initialisation."""

    source: str
    kind: str
    loaded: int
    missing: tuple[str, ...]
    skipped_shapes: tuple[str, ...] = ()

    def describe(self) -> str:
        skipped = f"; {len(self.skipped_shapes)} head tensors of another shape left initialised" \
            if self.skipped_shapes else ""
        return (f"loaded {self.loaded} tensors from {self.source} ({self.kind}); {len(self.missing)} model tensors "
                f"keep their initialisation" + (f" (e.g. {key_examples(self.missing)})" if self.missing else "")
                + skipped)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _backbone_name(bottom_up: nn.Module) -> str | None:
    """The timm architecture the model's backbone expects (Detectron2's ResNet: from its block counts)."""
    if isinstance(bottom_up, TimmBackbone):
        return bottom_up.model_name
    depth = resnet_depth(bottom_up.state_dict())
    return f"resnet{depth}" if depth else None


def _read(model: nn.Module, path: str, trust: bool) -> tuple[dict[str, Any], str]:
    """The checkpoint ``DetectionCheckpointer`` loads for ``path``, and what kind of file it was."""
    bottom_up = model.backbone.bottom_up
    expected = _backbone_name(bottom_up)
    try:
        weights: Weights = read_weights(path, expected, trust=trust, detectron2=True)
    except ArchitectureMismatch as error:
        setting = "timm backbone is {} (MODEL.TIMM.NAME)" if isinstance(bottom_up, TimmBackbone) else \
            "ResNet is {} (MODEL.RESNETS.DEPTH)"
        raise ConvertError(f"{path} holds {error.found} weights; the config's {setting.format(error.expected)}") \
            from None
    if weights.detectron2 is not None:
        return weights.detectron2, weights.layout
    if isinstance(bottom_up, TimmBackbone):
        unused = set(bottom_up.pruned)
        state = {k: v for k, v in weights.state_dict.items()
                 if k not in unused and not k.startswith(classifier_prefixes(bottom_up.model))}
        prefix, kind = BACKBONE_PREFIX + "model.", f"{weights.layout}, timm {weights.model_name}"
    else:
        state, _ = rename_resnet(weights.state_dict, path)
        prefix, kind = BACKBONE_PREFIX, f"{weights.layout}, timm {weights.model_name} renamed to Detectron2's ResNet"
    return {"model": {prefix + k: v for k, v in state.items()}}, kind


def load_detection_weights(model: nn.Module, path: str, evaluation: bool = False, trust: bool = False) -> WeightsReport:
    """Load ``path`` into ``model`` (any wrapper); returns what was loaded. :class:`ConvertError` if it does not fit.

    ``evaluation``: the file must set every tensor of the model (a trained model); otherwise only the backbone
    must be complete, and head tensors of another shape (another number of classes) stay initialised. ``trust``:
    unpickle the file fully even if it needs arbitrary classes (``--trust-weights``).
    """
    model = unwrap(model)
    checkpointer = DetectionCheckpointer(model)
    checkpoint, kind = _read(model, path, trust)
    count = len(checkpoint["model"])
    incompatible = checkpointer._load_model(checkpoint)
    shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
    bad_shapes = shapes if evaluation else [s for s, (k, _, _) in zip(shapes, incompatible.incorrect_shapes)
                                             if k.startswith("backbone.")]
    reshaped = {k for k, _, _ in incompatible.incorrect_shapes}
    bottom_up = getattr(model.backbone, "bottom_up", None)
    fresh = {BACKBONE_PREFIX + k for k in getattr(bottom_up, "fresh_keys", ())}  # new layers (stage norms)
    missing = [k for k in incompatible.missing_keys
               if (evaluation or (k.startswith(BACKBONE_PREFIX) and k not in fresh)) and k not in reshaped]
    problems = [f"{len(keys)} {what} ({key_examples(keys)})" for what, keys in
                (("missing", missing), ("unexpected", incompatible.unexpected_keys), ("of another shape", bad_shapes))
                if keys]
    if problems:
        raise ConvertError(f"{path} ({kind}) does not fit the config's model: " + "; ".join(problems))
    return WeightsReport(path, kind, count - len(incompatible.incorrect_shapes), tuple(incompatible.missing_keys),
                         tuple(shapes))
