"""Weights into this suite's SparK model: the encoder under ``encoder.model.``, the decoder where the file has one."""

from __future__ import annotations

from typing import Any, NamedTuple

from .files import WeightsError
from .reader import Weights
from .suite import ENCODER_PREFIX

__all__ = ["REBUILD_KEYS", "SparkLoad", "build_spark_model", "load_spark_weights"]

# SparK settings a file must record for its model to be rebuilt (the rest have build_spark's defaults).
REBUILD_KEYS = ("input_size", "decoder_width", "mask_ratio", "densify_norm")


class SparkLoad(NamedTuple):
    """What :func:`load_spark_weights` left at initialisation (``missing``) and did not load (``dropped``)."""

    missing: list[str]
    dropped: list[str]


def _no_decoder(weights: Weights) -> WeightsError:
    return WeightsError(f"{weights.path} ({weights.layout}) holds no SparK decoder: reconstructions need a "
                        "pretraining checkpoint-last.pth or a *_withdecoder_*_spark_style.pth")


def load_spark_weights(model: Any, weights: Weights, require_decoder: bool = True) -> SparkLoad:
    """Load ``weights`` into a :class:`~pretrain.spark.SparK` ``model``; returns what was missing and dropped.

    The encoder must load completely (bar ``weights.missing``, the layers after the last stage); the file's
    classifier is dropped. The decoder must match key for key and shape for shape when the file has one (or
    ``require_decoder``); an encoder-only file leaves it at initialisation. :class:`WeightsError` otherwise.
    """
    if require_decoder and not weights.decoder:
        raise _no_decoder(weights)
    expected = model.state_dict()
    encoder = {ENCODER_PREFIX + k: v for k, v in weights.state_dict.items()}
    state = {k: v for k, v in {**encoder, **(weights.decoder or {})}.items() if k in expected}
    dropped = sorted(set(encoder) - set(state)) + sorted(set(weights.decoder or {}) - set(state))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if tuple(v.shape) != tuple(expected[k].shape)]
    allowed = {ENCODER_PREFIX + k for k in weights.missing}
    missing = [k for k in expected if k not in state]
    wrong = [k for k in missing if k not in allowed and (weights.decoder or k.startswith(ENCODER_PREFIX))]
    undue = [k for k in dropped if not k.startswith(ENCODER_PREFIX)]  # decoder keys this model has no place for
    if shapes or wrong or undue:
        problems = [f"{len(keys)} {what} ({', '.join(keys[:4])})" for what, keys in
                    (("missing", wrong), ("unexpected", undue), ("of another shape", shapes)) if keys]
        raise WeightsError(f"cannot build the SparK model of {weights.path} ({weights.layout}): " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return SparkLoad(missing, dropped)


def build_spark_model(weights: Weights, mask_ratio: float | None = None) -> tuple[Any, dict[str, Any]]:
    """The SparK model (eval mode) a file with a decoder describes, and its settings (``model``, ``input_size``...).

    ``mask_ratio`` overrides the recorded ratio (it holds no weights). :class:`WeightsError` for a file without
    a decoder or the settings to rebuild it, or whose weights do not fit the model its settings describe.
    """
    from ..spark import build_spark

    if not weights.decoder:
        raise _no_decoder(weights)
    settings = dict(weights.spark or {})
    lacking = [key for key in REBUILD_KEYS if key not in settings]
    if lacking:
        raise WeightsError(f"{weights.path} ({weights.layout}) lacks {', '.join(lacking)} to rebuild its SparK model")
    if mask_ratio is not None:
        settings["mask_ratio"] = mask_ratio
    try:
        model = build_spark(weights.model_name, **settings)
    except (ValueError, TypeError) as error:
        raise WeightsError(f"cannot build the SparK model of {weights.path}: {error}") from error
    load_spark_weights(model, weights)
    return model.eval(), {"model": weights.model_name, **settings}
