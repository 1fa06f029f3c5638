"""The files the SparK authors released, and the official ConvNeXt naming their ConvNeXts use.

- ``<model>_1kpretrained_timm_style.pth``: the encoder's plain state dict in timm's names (no classifier),
  sometimes wrapped as ``{"module": state_dict}``;
- ``convnext{S,B,L}[_384]_1kpretrained_official_style.pth``: a plain state dict in the official ConvNeXt naming
  (``downsample_layers.I.J``, ``stages.I.J.dwconv``...), mapped with timm's own ConvNeXt checkpoint filter;
- ``<res50|...|cnxL384>_withdecoder_1kpretrained_spark_style.pth``: ``{"args", "input_size", "arch", "epoch",
  "performance_desc", "module", "optimizer", "is_pretrain"}`` where ``module`` is the published SparK model's
  state dict plus its ``config`` entry. Its parts map into this suite's :class:`~pretrain.spark.SparK` as
  :data:`DECODER_RULES` says; the published model keeps a projection at every scale but the coarsest when
  widths match, so the model is built with ``densify_proj="published"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .architectures import Architecture, key_examples
from .files import WeightsError
from .layout import Found, Layout, strip_prefix, tensor_dict

__all__ = ["CONVNEXT_OFFICIAL", "DECODER_RULES", "SPARK_STYLE", "WRAPPED", "encoder_naming",
           "official_convnext_to_timm"]

SPARK_ENCODER_PREFIX = "sparse_encoder.sp_cnn."
OFFICIAL_CONVNEXT_MARK = "downsample_layers."
# published SparK name -> this suite's SparK name (decoder blocks: ConvTranspose, conv, BN, ReLU6, conv, BN).
DECODER_RULES: tuple[tuple[str, str], ...] = (
    (r"dense_decoder\.dec\.(\d+)\.up_sample\.(\w+)", r"decoder.blocks.\1.0.\2"),
    (r"dense_decoder\.dec\.(\d+)\.conv\.0\.(\w+)", r"decoder.blocks.\1.1.\2"),
    (r"dense_decoder\.dec\.(\d+)\.conv\.1\.(\w+)", r"decoder.blocks.\1.2.\2"),
    (r"dense_decoder\.dec\.(\d+)\.conv\.3\.(\w+)", r"decoder.blocks.\1.4.\2"),
    (r"dense_decoder\.dec\.(\d+)\.conv\.4\.(\w+)", r"decoder.blocks.\1.5.\2"),
    (r"dense_decoder\.proj\.(\w+)", r"decoder.proj.\1"),
    (r"densify_norms\.(\d+)\.(\w+)", r"densify.\1.norm.\2"),
    (r"densify_projs\.(\d+)\.(\w+)", r"densify.\1.proj.\2"),
    (r"mask_tokens\.(\d+)", r"densify.\1.mask_token"),
)
_COMPILED = tuple((re.compile(pattern), template) for pattern, template in DECODER_RULES)
WRAPPERS = ("module", "model")  # keys a plain state dict is found under
UNUSED_BUFFERS = ("imn_m", "imn_s", "norm_black")  # registered by the published SparK, never used
DENSIFY_NORMS = {"bn": "bn", "ln": "ln"}  # published densify_norm_str -> this suite's densify_norm (else "none")


def encoder_naming(state: Mapping[str, Any]) -> str:
    """``convnext-official`` for the official ConvNeXt names, ``detectron2-resnet`` for Detectron2's, else ``timm``."""
    if any(k.startswith(OFFICIAL_CONVNEXT_MARK) for k in state):
        return "convnext-official"
    if "stem.conv1.weight" in state:
        return "detectron2-resnet"
    return "timm"


def official_convnext_to_timm(state: Mapping[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """Official ConvNeXt names -> timm's, with timm's own ``checkpoint_filter_fn`` (``arch.model`` gives shapes)."""
    from timm.models.convnext import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state), arch.model)


def _decoder(module: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The published decoder, densify norms, projections and mask tokens under this suite's names."""
    mapped, unknown = {}, []
    for key, value in module.items():
        if key.startswith(SPARK_ENCODER_PREFIX) or key in UNUSED_BUFFERS or not isinstance(value, torch.Tensor):
            continue
        for pattern, template in _COMPILED:
            if pattern.fullmatch(key):
                mapped[pattern.sub(template, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{len(unknown)} keys of the SparK model in this file have no place in this suite's SparK "
                           f"({key_examples(unknown)})")
    return mapped


def _spark_settings(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """:func:`~pretrain.spark.build_spark` arguments from the published model's ``config`` entry."""
    config = obj["module"].get("config")
    if not isinstance(config, Mapping):
        return None
    return {"input_size": int(config.get("sparse_encoder.input_size") or obj.get("input_size") or 224),
            "decoder_width": int(config.get("dense_decoder.width", 768)),
            "mask_ratio": float(config.get("mask_ratio", 0.6)),
            "densify_norm": DENSIFY_NORMS.get(str(config.get("densify_norm_str", "")).lower(), "none"),
            "hierarchy": int(config.get("hierarchy", 4)) > 1, "densify_proj": "published"}


def _is_spark_style(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping)
            and any(isinstance(k, str) and k.startswith(SPARK_ENCODER_PREFIX) for k in obj["module"]))


def _read_spark_style(obj: Mapping[str, Any]) -> Found:
    module = obj["module"]
    encoder = {k: v for k, v in strip_prefix(module, SPARK_ENCODER_PREFIX).items() if isinstance(v, torch.Tensor)}
    meta = {k: obj[k] for k in ("epoch", "performance_desc", "input_size") if k in obj}
    return Found(encoder, naming=encoder_naming(encoder), model_name=obj.get("arch") or None, decoder=_decoder(module),
                 spark=_spark_settings(obj), meta={**meta, "method": "SparK (published code)"})


def _is_wrapped(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(tensor_dict(obj.get(key)) for key in WRAPPERS)


def _read_wrapped(obj: Mapping[str, Any]) -> Found:
    state = next(obj[key] for key in WRAPPERS if tensor_dict(obj.get(key)))
    return Found(dict(state), naming=encoder_naming(state), meta={"epoch": obj.get("epoch")})


def _is_official(obj: Any) -> bool:
    return tensor_dict(obj) and encoder_naming(obj) == "convnext-official"


def _read_official(obj: Mapping[str, torch.Tensor]) -> Found:
    return Found(dict(obj), naming="convnext-official")


SPARK_STYLE = Layout("spark-style", "the published SparK code's *_withdecoder_1kpretrained_spark_style.pth (module "
                     "with sparse_encoder.sp_cnn.*, dense_decoder.*, config)", _is_spark_style, _read_spark_style)
WRAPPED = Layout("wrapped", "a state dict under 'module' or 'model' (some released *_timm_style.pth, official ConvNeXt "
                 "checkpoints)", _is_wrapped, _read_wrapped)
CONVNEXT_OFFICIAL = Layout("convnext-official", "a state dict in the official ConvNeXt naming (released "
                           "convnext*_1kpretrained_official_style.pth)", _is_official, _read_official)
