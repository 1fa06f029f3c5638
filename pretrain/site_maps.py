"""Reading the arguments of a torch call and telling feature maps from other tensors, for the handlers of
:mod:`pretrain.sparse_functions`, :mod:`pretrain.visible_norms` and :mod:`pretrain.sparse_attention`.

A feature map is a 4-D tensor of the masked batch, read as NCHW (or NHWC where a handler says so). Inside an
attention layer, per-head tensors ``(B, heads, ...)`` are not feature maps (see
:meth:`pretrain.mask_context.SparsityContext.is_per_head`). Every handler may assume that the masked sites of a
map it receives are exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .mask_context import SparsityContext

__all__ = [
    "Handler",
    "NoSparseVersion",
    "argument",
    "fill_masked",
    "is_map",
    "is_site_map",
    "mask_nchw",
    "mask_nhwc",
    "reduces_sites",
    "require_sites",
    "spatial_dims",
]

Handler = Callable[[SparsityContext, Callable, tuple, dict], Any]


class NoSparseVersion(NotImplementedError):
    """A function mixes the sites of a feature map in a way that has no sparse version here."""


def argument(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Positional argument ``index`` or keyword ``name`` of a call, else ``default``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def is_map(sparsity: SparsityContext, x: Any) -> bool:
    """Whether ``x`` is a 4-D tensor of the masked batch (read as NCHW) and not a per-head attention tensor."""
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] == sparsity.batch_size
            and not sparsity.is_per_head(x))


def is_site_map(sparsity: SparsityContext, x: Any) -> bool:
    """Whether ``x`` is an NCHW map whose spatial size has a mask in this pass."""
    return is_map(sparsity, x) and sparsity.lines_up(x.shape[-2], x.shape[-1])


def require_sites(sparsity: SparsityContext, x: torch.Tensor, what: str, height: int, width: int) -> None:
    """Raise unless ``x``, the input or output of ``what``, is a map of the masked batch with a mask."""
    if x.shape[0] != sparsity.batch_size:
        raise ValueError(
            f"{what} on a tensor of shape {tuple(x.shape)} whose first dimension is not the batch of "
            f"{sparsity.batch_size}: sites folded into the batch dimension cannot be masked"
        )
    sparsity.bool_mask(height, width)  # raises ValueError for a size that does not line up


def spatial_dims(x: torch.Tensor, dim: Any) -> tuple[int, ...] | None:
    """The reduced dimensions (non-negative) of a reduction over ``dim`` (None or () = all)."""
    if dim is None or (isinstance(dim, Sequence) and len(dim) == 0):
        return tuple(range(x.dim()))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % x.dim() for d in dims))


def reduces_sites(sparsity: SparsityContext, x: Any, dims: tuple[int, ...] | None) -> bool:
    """Whether a reduction of ``x`` over ``dims`` pools the sites of a feature map: both spatial dimensions.

    A reduction over the last dimension alone is read as one over the channels of a channels-last map (a
    hand-written norm), not as row pooling, which therefore is not made sparse.
    """
    return (is_map(sparsity, x) and dims is not None and 2 in dims and 3 in dims
            and x.shape[-2] * x.shape[-1] > 1)


def fill_masked(sparsity: SparsityContext, x: torch.Tensor, value: float) -> torch.Tensor:
    """``x`` (NCHW) with its masked sites set to ``value``; channels-last input stays channels-last.

    Max pools fill with the lowest finite value, not -inf: in a window of masked sites only, a finite value
    still wins over the implicit -inf padding, so the recorded argmax is an in-bounds (masked) site and the
    backward pass never indexes outside the input (that output is zeroed, so it gets no gradient anyway).
    """
    return torch.where(sparsity.bool_mask(x.shape[-2], x.shape[-1]), x, value)


def mask_nchw(sparsity: SparsityContext, out: torch.Tensor, what: str) -> torch.Tensor:
    """Zero the masked sites of an NCHW output in place (its producer does not keep it for backward)."""
    if out.dim() != 4 or sparsity.is_per_head(out):
        return out
    height, width = out.shape[-2:]
    require_sites(sparsity, out, what, height, width)
    return out.mul_(sparsity.mask(height, width, out.dtype))


def mask_nhwc(sparsity: SparsityContext, out: torch.Tensor, what: str) -> torch.Tensor:
    """Zero the masked sites of a channels-last ``(B, H, W, C)`` output in place."""
    if out.dim() != 4 or sparsity.is_per_head(out):
        return out
    height, width = out.shape[1:3]
    require_sites(sparsity, out, what, height, width)
    return out.mul_(sparsity.mask(height, width, out.dtype, channels_last=True))
