"""Loading weights into a Detectron2 model: pretrained backbones to start from, trained models to evaluate.

Accepted files (``--weights``):

- a Detectron2 ``.pkl`` (``python -m downstream.convert detectron2``, or any Detectron2-format pickle): loaded
  by ``DetectionCheckpointer`` with its name-matching heuristics;
- a Detectron2 ``.pth`` whose ``model`` holds full model names (``backbone.*``, ``roi_heads.*``: a trained model
  such as ``model_final.pth``);
- SparK / timm weights (``checkpoint-last.pth`` of pretraining, ``encoder_timm.pth``, the timm converter's output,
  a timm state dict): put under the backbone, timm names for the timm backbone, renamed for Detectron2's ResNet.

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

from pretrain.runtime.checkpoint import load_torch

from ..convert.to_detectron2 import rename_resnet
from ..convert.to_timm import ConvertError, classifier_prefixes, key_examples, read_timm_weights
from .backbone import TimmBackbone

__all__ = ["BACKBONE_PREFIX", "WeightsReport", "load_detection_weights", "unwrap"]

BACKBONE_PREFIX = "backbone.bottom_up."
MODEL_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.")


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
    """The model inside DistributedDataParallel and the training autocast wrapper."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "autocast_wrapper"):
        model = model.module
    return model


def _encoder_checkpoint(model: nn.Module, path: str) -> tuple[dict[str, Any], str]:
    """SparK/timm weights of ``path`` under the names of ``model``'s backbone; ``(checkpoint, kind)``."""
    weights = read_timm_weights(path)
    bottom_up = model.backbone.bottom_up
    if isinstance(bottom_up, TimmBackbone):
        if weights.model_name and weights.model_name != bottom_up.model_name:
            raise ConvertError(f"{path} holds {weights.model_name} weights; the config's timm backbone is "
                               f"{bottom_up.model_name} (MODEL.TIMM.NAME)")
        unused = set(bottom_up.pruned)
        state = {k: v for k, v in weights.state_dict.items()
                 if k not in unused and not k.startswith(classifier_prefixes(bottom_up.model))}
        prefix, kind = BACKBONE_PREFIX + "model.", f"timm {weights.model_name or 'weights'}"
    else:
        state, _ = rename_resnet(weights.state_dict, path)
        prefix, kind = BACKBONE_PREFIX, f"timm {weights.model_name or 'ResNet'} renamed to Detectron2's ResNet"
    return {"model": {prefix + k: v for k, v in state.items()}}, kind


def _read(checkpointer: DetectionCheckpointer, path: str) -> tuple[dict[str, Any], str]:
    if path.endswith(".pkl"):
        try:
            return checkpointer._load_file(path), "Detectron2 pickle"
        except Exception as error:  # pickle raises many types for damaged or foreign files
            raise ConvertError(f"cannot read {path} as a Detectron2 pickle: {type(error).__name__}: {error}") from error
    loaded = load_torch(path)
    state = loaded.get("model") if isinstance(loaded, dict) else None
    if isinstance(state, dict) and state and all(str(k).startswith(MODEL_PREFIXES) for k in state):
        return {"model": state}, "Detectron2 model"
    return _encoder_checkpoint(checkpointer.model, path)


def load_detection_weights(model: nn.Module, path: str, evaluation: bool = False) -> WeightsReport:
    """Load ``path`` into ``model`` (any wrapper); returns what was loaded. :class:`ConvertError` if it does not fit.

    ``evaluation``: the file must set every tensor of the model (a trained model); otherwise only the backbone
    must be complete, and head tensors of another shape (another number of classes) stay initialised.
    """
    model = unwrap(model)
    checkpointer = DetectionCheckpointer(model)
    checkpoint, kind = _read(checkpointer, path)
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
