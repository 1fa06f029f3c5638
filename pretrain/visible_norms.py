"""Normalisations and spread statistics whose reductions cover the sites of a feature map, over visible sites only.

The same arithmetic as the sparse BatchNorm without its batch reduction: every statistic is taken over the
visible sites alone, as if the masked ones did not exist, and masked sites of the output are exactly zero.

- ``group_norm``: per sample and group, over the group's channels and the visible sites (timm's ``GroupNorm``,
  ``GroupNorm1``, ``GroupNormAct``, PoolFormer's ``GroupNorm1NoBias`` all call it);
- ``instance_norm``: per sample and channel, over the visible sites; running statistics, when tracked, are
  updated from those (the mean over the batch of each instance's mean and unbiased variance, as torch does);
- ``layer_norm`` over several trailing dimensions that include both spatial ones: ``(H, W)`` or ``(C, H, W)`` of
  an NCHW map, ``(H, W, C)`` of a channels-last map; per sample, over the visible sites;
- ``var``, ``std``, ``var_mean``, ``std_mean`` over dimensions that include H and W: over the visible sites,
  with the requested correction (Bessel's by default) applied to the visible count.

Gradients are autograd's through these formulas, so they are the exact gradients of the visible-site
statistics. Half-precision maps are reduced in float32 and the result cast back. A reduction with no visible
site (a sample whose patches are all masked) gives zeros, not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from .mask_context import SparsityContext
from .site_maps import Handler, NoSparseVersion, argument, is_map, reduces_sites, require_sites, spatial_dims

__all__ = ["NORM_HANDLERS", "layer_norm_over_sites", "visible_moments"]

_REDUCED = (torch.bfloat16, torch.float16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _REDUCED else x.dtype


def visible_moments(
    x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], correction: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` over ``dims`` counting the sites where ``mask`` is 1, with ``keepdim``.

    ``x`` is zero where ``mask`` is 0; ``mask`` has ``x``'s rank and size 1 on the dimensions it does not vary
    over (channels). Returns ``(mean, var, centred, count)``: ``centred`` is ``(x - mean) * mask``, ``count``
    the number of visible elements per reduction. The variance divides by ``count - correction`` (at least 1).
    """
    count = mask.sum(dims, keepdim=True) * math.prod(x.shape[d] for d in dims if mask.shape[d] == 1)
    mean = x.sum(dims, keepdim=True) / count.clamp_min(1)
    centred = (x - mean) * mask
    var = centred.square().sum(dims, keepdim=True) / (count - correction).clamp_min(1)
    return mean, var, centred, count


def _normalise(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the visible elements of ``dims``, zero at masked sites."""
    _, var, centred, _ = visible_moments(x, mask, dims)
    return centred * torch.rsqrt(var + eps)


def _affine(out: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shape: tuple[int, ...],
            mask: torch.Tensor) -> torch.Tensor:
    """``out * weight + bias`` with the parameters viewed as ``shape``; a bias is taken off masked sites again."""
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = (out + bias.view(shape)) * mask
    return out


def _refuse_unreadable(sparsity: SparsityContext, x: Any, what: str) -> None:
    """Refuse ``what`` on a tensor of the batch with more than two dimensions that is not a feature map: its
    sites (tokens, folded patches) cannot be told apart here."""
    if isinstance(x, torch.Tensor) and x.dim() > 2 and x.shape[0] == sparsity.batch_size:
        raise NoSparseVersion(
            f"{what} on a tensor of shape {tuple(x.shape)} normalises over sites this suite cannot tell apart"
        )


def _group_norm(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    if not is_map(sparsity, x):
        _refuse_unreadable(sparsity, x, "group_norm")
        return func(*args, **kwargs)
    groups, weight, bias = (argument(args, kwargs, i, n) for i, n in ((1, "num_groups"), (2, "weight"), (3, "bias")))
    eps = argument(args, kwargs, 4, "eps", 1e-5)
    batch, channels, height, width = x.shape
    require_sites(sparsity, x, "a group norm", height, width)
    dtype = _compute_dtype(x)
    mask = sparsity.mask(height, width, dtype)
    grouped = x.to(dtype).reshape(batch, groups, channels // groups, height, width)
    out = _normalise(grouped, mask.view(batch, 1, 1, height, width), (2, 3, 4), eps).view(x.shape)
    return _affine(out, weight, bias, (1, channels, 1, 1), mask).to(x.dtype)


def _instance_norm(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    if not is_map(sparsity, x):
        _refuse_unreadable(sparsity, x, "instance_norm")
        return func(*args, **kwargs)
    names = ("running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    defaults = (None, None, None, None, True, 0.1, 1e-5)
    running_mean, running_var, weight, bias, use_input_stats, momentum, eps = (
        argument(args, kwargs, i + 1, n, d) for i, (n, d) in enumerate(zip(names, defaults, strict=True)))
    height, width = x.shape[-2:]
    require_sites(sparsity, x, "an instance norm", height, width)
    if not use_input_stats:  # running statistics: the same affine map at every site
        return func(*args, **kwargs).mul_(sparsity.mask(height, width, x.dtype))
    dtype = _compute_dtype(x)
    mask = sparsity.mask(height, width, dtype)
    mean, var, centred, count = visible_moments(x.to(dtype), mask, (2, 3))
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp_min(1)
            running_mean.lerp_(mean.mean(0).flatten().to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.mean(0).flatten().to(running_var.dtype), momentum)
    out = centred * torch.rsqrt(var + eps)
    return _affine(out, weight, bias, (1, x.shape[1], 1, 1), mask).to(x.dtype)


def layer_norm_over_sites(
    sparsity: SparsityContext, x: torch.Tensor, shape: tuple[int, ...], weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """``F.layer_norm(x, shape, ...)`` of a 4-D map over its last ``len(shape)`` dimensions when they include
    both spatial ones (``(H, W)`` or ``(C, H, W)`` of NCHW, ``(H, W, C)`` of NHWC), over visible sites."""
    count = len(shape)
    if count in (2, 3) and is_map(sparsity, x) and sparsity.lines_up(*x.shape[-2:]):
        mask_shape, sites = (x.shape[0], 1, *x.shape[-2:]), x.shape[-2:]
    elif count == 3 and is_map(sparsity, x) and sparsity.lines_up(*x.shape[1:3]):
        mask_shape, sites = (x.shape[0], *x.shape[1:3], 1), x.shape[1:3]
    else:
        raise NoSparseVersion(
            f"a LayerNorm over the last {count} dimensions of a map of shape {tuple(x.shape)} mixes sites "
            "without covering the whole map"
        )
    dtype = _compute_dtype(x)
    mask = sparsity.mask(*sites, dtype).reshape(mask_shape)
    dims = tuple(range(4 - count, 4))
    out = _normalise(x.to(dtype), mask, dims, eps)
    return _affine(out, weight, bias, tuple(shape), mask).to(x.dtype)


def _spread_arguments(args: tuple, kwargs: dict) -> tuple[Any, int, bool]:
    """``(dim, correction, keepdim)`` of a call of ``var``/``std``/``var_mean``/``std_mean`` in any of their
    signatures: ``(x, unbiased)``, ``(x, dim, unbiased, keepdim)``, ``(x, dim, *, correction, keepdim)``."""
    rest = list(args[1:])
    dim, unbiased, keepdim = kwargs.get("dim"), kwargs.get("unbiased"), kwargs.get("keepdim", False)
    if rest and isinstance(rest[0], bool):
        unbiased = rest.pop(0)
    elif rest:
        dim = rest.pop(0)
        if rest:
            unbiased = rest.pop(0)
        if rest:
            keepdim = rest.pop(0)
    correction = kwargs.get("correction")
    if correction is None:
        correction = 1 if unbiased is None else int(unbiased)
    return dim, int(correction), bool(keepdim)


def _spread(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Variance or standard deviation (with or without the mean) over dimensions that include H and W."""
    x = args[0]
    dim, correction, keepdim = _spread_arguments(args, kwargs)
    dims = spatial_dims(x, dim) if isinstance(x, torch.Tensor) else None
    if not reduces_sites(sparsity, x, dims):
        return func(*args, **kwargs)
    require_sites(sparsity, x, func.__name__, *x.shape[-2:])
    dtype = _compute_dtype(x)
    mean, var, _, _ = visible_moments(x.to(dtype), sparsity.mask(*x.shape[-2:], dtype), dims, correction)
    spread = var.sqrt() if func.__name__.startswith("std") else var
    if not keepdim:
        spread, mean = spread.squeeze(dims), mean.squeeze(dims)
    spread, mean = spread.to(x.dtype), mean.to(x.dtype)
    return (spread, mean) if func.__name__.endswith("_mean") else spread


# Handlers for the functional form of these norms and statistics (merged into sparse_functions.HANDLERS).
NORM_HANDLERS: Mapping[Callable, Handler] = MappingProxyType({
    F.group_norm: _group_norm,
    F.instance_norm: _instance_norm,
    torch.var: _spread,
    torch.Tensor.var: _spread,
    torch.std: _spread,
    torch.Tensor.std: _spread,
    torch.var_mean: _spread,
    torch.std_mean: _spread,
})
