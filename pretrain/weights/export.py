"""Weights out, in the layouts timm reads.

- :func:`timm_file_payload`: ``encoder_timm.pth`` (and the timm converter's output): ``{"state_dict", "model_name",
  "meta"}`` where ``state_dict`` holds every key of ``timm.create_model(model_name)`` at timm's default 1000
  classes. Keys the encoder has no trained value for (the classifier; ConvNeXt's ``head.norm`` when a file
  lacks it) come from timm's own initialisation with seed :data:`FRESH_SEED` and are listed in
  ``meta["untrained"]``; the reader leaves them out again. So it loads strictly into
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": PATH})`` and through
  ``timm.models.load_checkpoint`` (timm's ``train.py --initial-checkpoint``), and with the classifier dropped
  (``train.py --pretrained --pretrained-path PATH``, any ``--num-classes``).
- :func:`write_hub_folder`: a Hugging Face Hub model folder for timm (``model.safetensors`` + ``config.json``)
  written by timm's own ``save_for_hf`` for the headless model (``num_classes`` 0):
  ``timm.create_model("local-dir:DIR", pretrained=True[, num_classes=K])`` loads it offline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pretrain.runtime.io import staged_folder

from .files import HUB_CONFIG, WeightsError
from .reader import Weights

__all__ = ["FRESH_SEED", "HUB_PRETRAINED_CFG", "fresh_timm_model", "fresh_timm_state", "timm_file_payload",
           "write_hub_folder"]

FRESH_SEED = 0  # seed of the timm initialisation that fills untrained keys (a fresh classifier)
# pretrained_cfg entries of an exported Hub folder: SparK weights, not the weights timm's default tag describes.
HUB_PRETRAINED_CFG = {
    "tag": "spark", "description": "SparK self-supervised encoder (no trained classifier)",
    "paper_name": "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling",
    "paper_ids": "arXiv:2301.03580", "origin_url": None, "license": None, "notes": None,
    "test_input_size": None, "test_crop_pct": None, "label_names": None, "label_descriptions": None,
}


def fresh_timm_model(model_name: str, **timm_kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` initialised with seed :data:`FRESH_SEED`, without touching
    the caller's random generators."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_SEED)
        return timm.create_model(model_name, pretrained=False, **timm_kwargs)


def fresh_timm_state(model_name: str, **timm_kwargs: Any) -> dict[str, torch.Tensor]:
    """The state dict of :func:`fresh_timm_model`."""
    return fresh_timm_model(model_name, **timm_kwargs).state_dict()


def timm_file_payload(state: Mapping[str, torch.Tensor], model_name: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``{"state_dict", "model_name", "meta"}``: ``state`` (timm keys of the encoder) completed to every key of
    ``timm.create_model(model_name)`` with timm's initialisation, which ``meta["untrained"]`` lists.

    ``state`` must not hold a classifier of another size (drop a source classifier first).
    """
    full = fresh_timm_state(model_name)
    unexpected = [k for k in state if k not in full or tuple(state[k].shape) != tuple(full[k].shape)]
    if unexpected:
        raise WeightsError(f"{len(unexpected)} tensors do not fit timm {model_name} ({', '.join(unexpected[:4])})")
    untrained = sorted(k for k in full if k not in state)
    return {
        "state_dict": {k: (state[k] if k in state else full[k]).detach().cpu().clone() for k in full},
        "model_name": model_name,
        "meta": {**meta, "untrained": untrained},
    }


def _without_classifier(weights: Weights) -> dict[str, torch.Tensor]:
    from .architectures import architecture

    arch = architecture(weights.model_name)
    return {k: v for k, v in weights.state_dict.items() if not arch.is_classifier(k)}


def write_hub_folder(weights: Weights, folder: str | os.PathLike, force: bool = False) -> Path:
    """Write ``folder`` (``model.safetensors`` + ``config.json``) for the headless timm model of ``weights``.

    Written into a sibling temporary folder and renamed into place, so a failure leaves nothing behind. An
    existing ``folder`` is an error unless ``force`` (then it is replaced). Returns the folder.
    """
    from timm.models import save_for_hf

    folder = Path(folder)
    if folder.exists() and not force:
        raise WeightsError(f"{folder} exists; add --force to replace it")
    model = fresh_timm_model(weights.model_name, num_classes=0, pretrained_cfg_overlay=HUB_PRETRAINED_CFG)
    result = model.load_state_dict(_without_classifier(weights), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(weights.missing):
        raise WeightsError(f"{weights.path} does not fit headless timm {weights.model_name}: missing "
                           f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
    with staged_folder(folder, overwrite=force) as tmp:
        save_for_hf(model, str(tmp), safe_serialization=True)
        if not (tmp / HUB_CONFIG).is_file():
            raise WeightsError(f"timm wrote no {HUB_CONFIG} into {tmp}")
    return folder
