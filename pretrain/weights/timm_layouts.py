"""timm's layouts: training checkpoints, Hugging Face Hub folders and plain state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .files import HubFolder
from .layout import Found, Layout, tensor_dict
from .released import encoder_naming

__all__ = ["HUB_FOLDER", "STATE_DICT", "TIMM_CHECKPOINT"]

EMA_KEYS = ("state_dict_ema", "model_ema")  # what timm's load_state_dict prefers, in its order


def _clean(state: Mapping[str, Any]) -> dict[str, Any]:
    """timm's ``clean_state_dict``: DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes removed."""
    from timm.models import clean_state_dict

    return clean_state_dict(dict(state))


def _is_training(obj: Any) -> bool:
    return isinstance(obj, Mapping) and tensor_dict(obj.get("state_dict"))


def _read_training(obj: Mapping[str, Any]) -> Found:
    variants = {key: _clean(obj[key]) for key in EMA_KEYS if tensor_dict(obj.get(key))}
    name = obj.get("arch") or obj.get("model_name")
    return Found(_clean(obj["state_dict"]), model_name=name if isinstance(name, str) and name else None,
                 variants=variants, meta={"epoch": obj.get("epoch"), "source": "timm training checkpoint"})


def _is_hub(obj: Any) -> bool:
    return isinstance(obj, HubFolder)


def _read_hub(obj: HubFolder) -> Found:
    name = obj.config.get("architecture")
    return Found(dict(obj.state_dict), model_name=name if isinstance(name, str) and name else None,
                 meta={"source": "Hugging Face Hub folder", "num_classes": obj.config.get("num_classes")})


def _read_plain(obj: Mapping[str, Any]) -> Found:
    state = _clean(obj)
    return Found(state, naming=encoder_naming(state), meta={"source": "state dict"})


TIMM_CHECKPOINT = Layout("timm-checkpoint", "a timm training checkpoint (state_dict, optionally state_dict_ema, arch)",
                         _is_training, _read_training)
HUB_FOLDER = Layout("hf-folder", "a Hugging Face Hub folder for timm (config.json + model.safetensors)", _is_hub,
                    _read_hub)
STATE_DICT = Layout("state-dict", "a plain state dict (released *_1kpretrained_timm_style.pth)", tensor_dict,
                    _read_plain)
