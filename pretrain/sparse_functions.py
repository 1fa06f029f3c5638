"""Sparse semantics for the functional part of a forward pass, whatever module or function calls it.

A timm block does much of its spatial work through functions rather than layers: ``x.mean((2, 3))`` in a
squeeze-excitation, ``F.adaptive_avg_pool2d(x, 1)`` in an effective SE, ``x.sum(1).mean((2, 3))`` in a
selective-kernel unit, a softmax over the flattened map in a global-context block, ``F.pad`` in a stem,
``F.conv2d`` with a fixed blur filter. :class:`SparseFunctionMode`, a ``TorchFunctionMode`` that the sparse
encoder enters only for the duration of its own forward pass, sees every such call and rewrites those that
touch sites (the table :data:`HANDLERS`, one entry per torch function):

- convolutions, linear layers and LayerNorms on feature maps (NCHW, or NHWC for linear layers and norms
  over the last dimension) write exact zeros to masked sites;
- norms and spread statistics over sites (group, instance and multi-dimensional layer norms, ``var``/``std``
  over H and W) take their statistics over visible sites (:mod:`pretrain.visible_norms`);
- attention attends over visible keys (``scaled_dot_product_attention``, softmaxes over keys inside attention
  layers, token pooling; :mod:`pretrain.sparse_attention`);
- averages (``mean`` over spatial dimensions, average and adaptive average pools) divide by the visible
  sites they cover; maxima and minima (max pools, ``amax``/``amin``) ignore masked sites; a softmax over
  the flattened positions of a map (attention pooling) gives masked positions zero weight;
- the results line up with the patches again: a map upsampled by ``interpolate`` (bilinearly: from visible
  sources only), or a map plus a pooled ``(B, C, 1, 1)`` vector, is zero at masked sites; a map padded by
  ``F.pad`` gets a mask that follows the real positions (:meth:`SparsityContext.register_padding`);
- outputs coarser than the patch grid (the ``1x1`` of a global pool) are not feature maps that must be zero
  anywhere: they are kept for every sample with a visible patch (see :mod:`pretrain.mask_context`);
- functions that mix sites in a way with no sparse form here (attention over tokens that cannot be identified
  as sites, causal attention, multi-dimensional LayerNorms that do not cover a whole map, adaptive pools to
  non-dividing sizes) raise :class:`NoSparseVersion` (a ``NotImplementedError``), which the encoder turns into a
  refusal when it is built.

Tensors are read as NCHW when they are 4-D with the mask's batch size (per-head tensors of an attention layer
excepted); sites folded into the batch dimension are refused unless the layer that folds them declares how
(:mod:`pretrain.attention_layers`). Masked sites of a map entering any of these functions are already zero
(every producer above guarantees it), so visible sums are plain sums.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .mask_context import SparsityContext
from .site_maps import Handler, NoSparseVersion, fill_masked
from .site_maps import argument as _argument
from .site_maps import is_map as _is_map
from .site_maps import is_site_map as _is_site_map
from .site_maps import mask_nchw as _mask_nchw
from .site_maps import mask_nhwc as _mask_nhwc
from .site_maps import reduces_sites as _reduces_sites
from .site_maps import require_sites as _require_sites
from .site_maps import spatial_dims as _spatial_dims
from .sparse_attention import ATTENTION_HANDLERS, mask_token_rows, masked_softmax
from .visible_norms import NORM_HANDLERS, layer_norm_over_sites

__all__ = ["HANDLERS", "NoSparseVersion", "SparseFunctionMode", "fill_masked"]

class SparseFunctionMode(TorchFunctionMode):
    """While active, torch functions on feature maps follow the sparse semantics of ``sparsity``'s mask."""

    def __init__(self, sparsity: SparsityContext) -> None:
        super().__init__()
        self.sparsity = sparsity

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        handler = HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self.sparsity, func, args, kwargs or {})


# --- layers that compute per site -------------------------------------------------------------------------


def _conv(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    return _mask_nchw(sparsity, func(*args, **kwargs), "a convolution")


def _linear(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    # on 4-D maps only in channels-last blocks (ConvNeXt's linear MLP); on tokens inside attention layers
    out = func(*args, **kwargs)
    return mask_token_rows(sparsity, out) if out.dim() == 3 else _mask_nhwc(sparsity, out, "a linear layer")


def _layer_norm(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x, shape = args[0], _argument(args, kwargs, 1, "normalized_shape")
    if x.dim() == 4 and not isinstance(shape, int) and len(shape) != 1:  # over H and W too: visible sites
        weight, bias = _argument(args, kwargs, 2, "weight"), _argument(args, kwargs, 3, "bias")
        return layer_norm_over_sites(sparsity, x, tuple(shape), weight, bias, _argument(args, kwargs, 4, "eps", 1e-5))
    out = func(*args, **kwargs)
    return mask_token_rows(sparsity, out) if x.dim() == 3 else _mask_nhwc(sparsity, out, "a LayerNorm")


# --- averages, maxima and softmax over sites --------------------------------------------------------------


def _visible_count(sparsity: SparsityContext, x: torch.Tensor, dims: tuple[int, ...], keepdim: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """Number of visible elements in each reduction of ``x`` over ``dims`` (at least 1), in ``dtype``."""
    height, width = x.shape[-2:]
    channels = x.shape[1] if 1 in dims else 1

    def compute() -> torch.Tensor:
        count = sparsity.mask(height, width, dtype).sum(dims, keepdim=keepdim)
        return (count * channels).clamp_min_(1)

    return sparsity.cached(("visible-count", height, width, dims, keepdim, dtype, channels), compute)


def _visible_mean(sparsity: SparsityContext, x: torch.Tensor, dims: tuple[int, ...], keepdim: bool,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` counting visible sites only (masked sites of ``x`` are zero); a bf16/fp16
    map is summed and divided in float32, as ``mean`` accumulates, and the result cast back."""
    if dtype is None and x.dtype in (torch.bfloat16, torch.float16):
        return _visible_mean(sparsity, x, dims, keepdim, torch.float32).to(x.dtype)
    total = x.sum(dims, keepdim=keepdim, dtype=dtype)
    return total / _visible_count(sparsity, x, dims, keepdim, total.dtype)


def _mean(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    dims = _spatial_dims(x, _argument(args, kwargs, 1, "dim")) if isinstance(x, torch.Tensor) else None
    flat = _flattened(sparsity, x)
    if flat is not None and dims == (x.dim() - 1,):  # the positions of a flattened map
        total = x.sum(-1, keepdim=True, dtype=kwargs.get("dtype"))
        counts = sparsity.visible_per_sample(*flat).clamp_min(1).to(total.dtype).view(-1, *([1] * (x.dim() - 1)))
        mean = total / counts
        return mean if _argument(args, kwargs, 2, "keepdim", False) else mean.squeeze(-1)
    if not _reduces_sites(sparsity, x, dims):
        return func(*args, **kwargs)
    _require_sites(sparsity, x, "a mean", *x.shape[-2:])
    return _visible_mean(sparsity, x, dims, _argument(args, kwargs, 2, "keepdim", False), kwargs.get("dtype"))


def _extreme(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """``amax``/``amin`` over sites: masked sites never win; a reduction without visible sites gives 0."""
    x = args[0]
    dims = _spatial_dims(x, _argument(args, kwargs, 1, "dim")) if isinstance(x, torch.Tensor) else None
    if not _reduces_sites(sparsity, x, dims):
        return func(*args, **kwargs)
    _require_sites(sparsity, x, func.__name__, *x.shape[-2:])
    keepdim = _argument(args, kwargs, 2, "keepdim", False)
    info = torch.finfo(x.dtype)
    result = func(fill_masked(sparsity, x, info.min if func.__name__ == "amax" else info.max), dims, keepdim)
    seen = sparsity.bool_mask(*x.shape[-2:]).any(dim=dims, keepdim=keepdim)
    return torch.where(seen, result, 0.0)


def _pool_output(sparsity: SparsityContext, out: torch.Tensor) -> torch.Tensor:
    """The visible sites of a pool's output (which must line up with the patches)."""
    return sparsity.mask(out.shape[-2], out.shape[-1], out.dtype)


def _pool_geometry(kernel: Any, stride: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kernel and stride as pairs (no stride: the kernel's)."""
    kernel = torch.nn.modules.utils._pair(kernel)
    stride = kernel if stride is None or (isinstance(stride, Sequence) and len(stride) == 0) else stride
    return kernel, torch.nn.modules.utils._pair(stride)


def _avg_pool(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """An average pool over visible inputs: the dense result divided by the visible share of its divisor.

    With ``count_include_pad`` the padding keeps counting (as in the dense model), masked inputs do not:
    share = (visible + padding) / divisor = 1 - (in-bounds - visible) / divisor, exactly 1 when all visible.
    With ``divisor_override`` the pool is a scaled sum, whose masked terms are already zero.
    """
    x = args[0]
    if not _is_map(sparsity, x):
        return func(*args, **kwargs)
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    defaults = (None, None, 0, False, True, None)
    settings = [_argument(args, kwargs, i + 1, n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    kernel, stride = _pool_geometry(settings[0], settings[1])
    padding, ceil_mode, count_include_pad, divisor = settings[2:]
    _require_sites(sparsity, x, "an average pool", *x.shape[-2:])
    out = func(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    _require_sites(sparsity, out, "an average pool", *out.shape[-2:])
    if divisor is None:
        geometry = (kernel, stride, padding, ceil_mode, count_include_pad)
        visible = F.avg_pool2d(sparsity.mask(*x.shape[-2:], out.dtype), *geometry)
        if count_include_pad:
            inside = sparsity.cached(
                ("in-bounds", *x.shape[-2:], *geometry, out.dtype),
                lambda: F.avg_pool2d(x.new_ones(1, 1, *x.shape[-2:], dtype=out.dtype), *geometry),
            )
            share = 1 - (inside - visible)
        else:
            share = visible
        out = out / share.clamp_min(1e-6)
    return out * _pool_output(sparsity, out)


def _max_pool(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
    """A max pool whose masked inputs never win and whose masked outputs are zero."""
    x = args[0]
    if not _is_map(sparsity, x):
        return func(*args, **kwargs)
    _require_sites(sparsity, x, "a max pool", *x.shape[-2:])
    result = func(fill_masked(sparsity, x, torch.finfo(x.dtype).min), *args[1:], **kwargs)
    values = result[0] if isinstance(result, tuple) else result
    _require_sites(sparsity, values, "a max pool", *values.shape[-2:])
    values = torch.where(sparsity.bool_mask(*values.shape[-2:]), values, 0.0)
    return (values, *result[1:]) if isinstance(result, tuple) else values


def _adaptive_size(x: torch.Tensor, size: Any) -> tuple[int, int]:
    size = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(size))


def _adaptive(
    pool: Handler, fixed: Callable, whole: Callable[[SparsityContext, torch.Tensor], torch.Tensor], what: str
) -> Handler:
    """An adaptive pool: to ``1x1`` as ``whole``, to a size dividing the input as the ``pool`` handler of the
    ``fixed`` pool with kernel = stride = input / output; ``what`` names it in errors."""

    def handler(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        if not _is_map(sparsity, x):
            return func(*args, **kwargs)
        size, (height, width) = _adaptive_size(x, _argument(args, kwargs, 1, "output_size")), x.shape[-2:]
        if size == (height, width):
            return func(*args, **kwargs)
        if _argument(args, kwargs, 2, "return_indices", False):
            raise NoSparseVersion(f"adaptive {what} pooling with indices has no sparse version")
        _require_sites(sparsity, x, f"an adaptive {what} pool", height, width)
        if size == (1, 1):
            return whole(sparsity, x)
        if height % size[0] or width % size[1]:
            raise NoSparseVersion(
                f"adaptive {what} pooling from {height}x{width} to {size[0]}x{size[1]} has no sparse version"
            )
        kernel = (height // size[0], width // size[1])
        return pool(sparsity, fixed, (x, kernel, kernel), {})

    return handler


def _whole_mean(sparsity: SparsityContext, x: torch.Tensor) -> torch.Tensor:
    return _visible_mean(sparsity, x, (2, 3), keepdim=True)


def _whole_max(sparsity: SparsityContext, x: torch.Tensor) -> torch.Tensor:
    return _extreme(sparsity, torch.amax, (x, (2, 3), True), {})


def _flattened(sparsity: SparsityContext, x: Any) -> tuple[int, int] | None:
    """``(H, W)`` if ``x`` is a map ``(B, C, H, W)`` of this pass flattened to ``(B, C', H*W)``, else None."""
    return sparsity.flattened_size(x) if isinstance(x, torch.Tensor) else None


def _reshape(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Reshapes pass through; a map flattened to ``(B, C', H*W)`` is remembered for the softmax and mean; a map
    rebuilt from a per-head tensor of an attention layer (whose masked query rows a talking-head mixing may have
    filled) is zero at masked sites again."""
    out = func(*args, **kwargs)
    x = args[0]
    if not isinstance(out, torch.Tensor):
        return out
    if (out.dim() == 3 and _is_site_map(sparsity, x)
            and out.shape[0] == x.shape[0] and out.shape[-1] == x.shape[-2] * x.shape[-1] > 1):
        sparsity.note_flattened(out, (x.shape[-2], x.shape[-1]))
    elif sparsity.is_per_head(x) and _is_site_map(sparsity, out):
        return out * sparsity.mask(*out.shape[-2:], out.dtype)
    return out


def _softmax(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """A softmax over the flattened positions of a map (attention pooling) weighs visible positions only."""
    x, dim = args[0], _argument(args, kwargs, 1, "dim")
    flat = _flattened(sparsity, x)
    if flat is None or dim is None or dim % x.dim() != x.dim() - 1:
        weights = masked_softmax(sparsity, func, args, kwargs)  # over the keys of attention logits
        return func(*args, **kwargs) if weights is None else weights
    visible = sparsity.bool_mask(*flat).view(x.shape[0], 1, -1)
    weights = func(x.masked_fill(~visible, torch.finfo(x.dtype).min), *args[1:], **kwargs)
    return weights * visible  # a sample without visible positions pools nothing


# --- maps that must line up with the patches again ---------------------------------------------------------


def _broadcast_add(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
    """A map plus (or minus) anything that is not a map of its size (a pooled ``(B, C, 1, 1)`` vector, a
    per-channel bias, a scalar) is zero at masked sites again; map plus map needs nothing."""
    out = func(*args, **kwargs)
    if not (_is_site_map(sparsity, out) and out.shape[-2] * out.shape[-1] > 1):
        return out
    operands = (args[0], _argument(args, kwargs, 1, "other"))
    if all(isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[-2:] == out.shape[-2:] for a in operands):
        return out
    return out.mul_(sparsity.mask(*out.shape[-2:], out.dtype))


def _interpolate(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
    """A resampled map is zero at masked sites again; a bilinear one weighs visible sources only (the weights of
    each output renormalised over its visible sources: interpolate(x) / interpolate(mask)), which at the border
    of a visible region is what the dense resampling of that region alone computes, edge clamping included."""
    x = args[0]
    if not _is_site_map(sparsity, x):
        return func(*args, **kwargs)
    if _argument(args, kwargs, 3, "mode", "nearest") != "bilinear":
        out = func(*args, **kwargs)
    else:
        visible = sparsity.mask(*x.shape[-2:], x.dtype)
        out = func(x * visible, *args[1:], **kwargs)
        out = out / func(visible, *args[1:], **kwargs).clamp_min(torch.finfo(out.dtype).tiny)
    if _is_site_map(sparsity, out):
        return out.mul_(sparsity.mask(*out.shape[-2:], out.dtype))
    return out


def _pad(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
    x, pad = args[0], _argument(args, kwargs, 1, "pad")
    out = func(*args, **kwargs)
    # a map padded for the windows of an attention layer is read only as keys, whose visibility the layer declares
    if _is_site_map(sparsity, x) and len(pad) in (2, 4) and not sparsity.windowed:
        sparsity.register_padding((x.shape[-2], x.shape[-1]), pad)
    return out


_ADAPTIVE_MAX = _adaptive(_max_pool, F.max_pool2d, _whole_max, "max")

# One entry per torch function: how it runs on feature maps while the sparse encoder holds a mask (norms and
# spreads over sites: pretrain.visible_norms; attention: pretrain.sparse_attention).
HANDLERS: Mapping[Callable, Handler] = MappingProxyType({
    **NORM_HANDLERS,
    **ATTENTION_HANDLERS,
    torch.conv2d: _conv,
    F.linear: _linear,
    F.layer_norm: _layer_norm,
    torch.mean: _mean,
    torch.Tensor.mean: _mean,
    torch.amax: _extreme,
    torch.Tensor.amax: _extreme,
    torch.amin: _extreme,
    torch.Tensor.amin: _extreme,
    F.avg_pool2d: _avg_pool,
    F.max_pool2d: _max_pool,
    F.max_pool2d_with_indices: _max_pool,  # F.max_pool2d(..., return_indices=True) dispatches here
    F.adaptive_avg_pool2d: _adaptive(_avg_pool, F.avg_pool2d, _whole_mean, "average"),
    F.adaptive_max_pool2d: _ADAPTIVE_MAX,
    F.adaptive_max_pool2d_with_indices: _ADAPTIVE_MAX,  # likewise, with indices: refused
    torch.flatten: _reshape,
    torch.Tensor.flatten: _reshape,
    torch.reshape: _reshape,
    torch.Tensor.reshape: _reshape,
    torch.Tensor.view: _reshape,
    torch.softmax: _softmax,
    torch.Tensor.softmax: _softmax,
    F.softmax: _softmax,
    torch.add: _broadcast_add,
    torch.Tensor.add: _broadcast_add,
    torch.Tensor.add_: _broadcast_add,
    torch.sub: _broadcast_add,
    torch.Tensor.sub: _broadcast_add,
    torch.Tensor.sub_: _broadcast_add,
    torch.Tensor.__rsub__: _broadcast_add,
    F.interpolate: _interpolate,
    F.pad: _pad,
})
