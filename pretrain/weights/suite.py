"""This suite's own files: the pretraining ``checkpoint-last.pth``, the fine-tuning ``checkpoint-last.pth`` and
``encoder_timm.pth`` (also what ``python -m downstream.convert timm`` writes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .layout import Found, Layout, strip_prefix, tensor_dict

__all__ = ["CLS_STAGE", "ENCODER_FILE", "ENCODER_PREFIX", "FINETUNING", "PRETRAINING", "STAGE_KEY"]

ENCODER_PREFIX = "encoder.model."  # where the timm encoder's keys sit in the SparK model's state dict
STAGE_KEY = "stage"  # entry marking a fine-tuning checkpoint of ``python -m downstream.cls``
CLS_STAGE = "cls"
EMA_PREFIX = "module."  # timm's ModelEmaV3 keeps the averaged model as ``module``


def _is_pretraining(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "model" in obj["config"]
            and tensor_dict(obj.get("model")) and any(k.startswith(ENCODER_PREFIX) for k in obj["model"]))


def _read_pretraining(obj: Mapping[str, Any]) -> Found:
    from ..spark import SPARK_CONFIG_KEYS

    config = obj["config"]
    decoder = {k: v for k, v in obj["model"].items() if not k.startswith(ENCODER_PREFIX)}
    return Found(strip_prefix(obj["model"], ENCODER_PREFIX), model_name=config["model"], decoder=decoder,
                 spark={k: config[k] for k in SPARK_CONFIG_KEYS if k in config},
                 meta={"epoch": obj.get("epoch"), "iteration": obj.get("iteration"), "method": "SparK",
                       "config": dict(config)})


def _is_finetuning(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and obj.get(STAGE_KEY) == CLS_STAGE and tensor_dict(obj.get("model"))
            and isinstance(obj.get("config"), Mapping) and "model" in obj["config"])


def _read_finetuning(obj: Mapping[str, Any]) -> Found:
    emas = obj.get("ema") or {}
    variants = {name: strip_prefix(state, EMA_PREFIX) for name, state in emas.items() if isinstance(state, Mapping)}
    return Found(dict(obj["model"]), model_name=obj["config"]["model"], variants=variants,
                 meta={"epoch": obj.get("epoch"), "source": "fine-tuning checkpoint"})


def _is_encoder(obj: Any) -> bool:
    return isinstance(obj, Mapping) and tensor_dict(obj.get("state_dict")) and isinstance(obj.get("model_name"), str)


def _read_encoder(obj: Mapping[str, Any]) -> Found:
    meta = dict(obj.get("meta") or {})
    return Found(dict(obj["state_dict"]), model_name=obj["model_name"], untrained=tuple(meta.get("untrained", ())),
                 meta=meta)


PRETRAINING = Layout("spark-pretraining", "this suite's pretraining checkpoint-last.pth (model with encoder.model.*, "
                     "config)", _is_pretraining, _read_pretraining)
FINETUNING = Layout("spark-finetuning", "this suite's fine-tuning checkpoint-last.pth (stage 'cls', model, ema, "
                    "config)", _is_finetuning, _read_finetuning)
ENCODER_FILE = Layout("encoder-timm", "encoder_timm.pth or the timm converter's output (state_dict, model_name, meta)",
                      _is_encoder, _read_encoder)
