"""Attention over visible tokens: the function-level half of sparse attention (the layer half, which declares
what the tokens of a layer are, is :mod:`pretrain.attention_layers`).

The sparse meaning of attention is the one SparK gives convolutions: compute as if the masked sites did not
exist. A query at a visible site attends to visible keys only; a query at a masked site, or one whose window
holds no visible key, outputs zeros. Keys are told from the token sequence's length (the row-major sites of
the one map size with that many sites) or from what the running attention layer declared
(:class:`pretrain.mask_context.TokenScope`):

- ``scaled_dot_product_attention``: a boolean key mask joins the call's own mask; masked query rows and rows
  without a visible key are zeroed. Causal attention has no sparse meaning and is refused, as are tokens that
  cannot be identified as sites (folded into the batch by a layer that declares nothing);
- a softmax over the last dimension inside an attention layer (the explicit ``q @ k^T`` form, with whatever
  relative position bias or talking-head mixing was added to the logits) gives masked keys zero weight and
  masked queries zero weights, so their outputs are zero;
- inside an attention layer, linear layers and LayerNorms on token sequences ``(B, n, C)`` zero the rows of
  masked tokens, so that statistics over tokens (the L2 norms of cross-covariance attention, the sums of
  additive attention) cover visible tokens only, and a position embedding added to tokens is taken off again;
- ``avg_pool1d`` of a token sequence (NextViT's keys pooled in raster order) averages visible tokens, and a
  pooled token is visible when any token it covers is; its visibility is declared for the keys that follow.

Tokens at masked sites may carry values between these operations (a position embedding, a bias); they never
reach a visible token, and the next linear layer or norm on the tokens, or the next convolution or norm on the
map they are folded back into, zeroes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from .mask_context import SparsityContext
from .site_maps import Handler, NoSparseVersion, argument

__all__ = ["ATTENTION_HANDLERS", "mask_token_rows", "masked_softmax"]

_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def mask_token_rows(sparsity: SparsityContext, out: torch.Tensor) -> torch.Tensor:
    """Inside an attention layer, zero in place the rows of a token sequence ``(B', n, C)`` at masked sites."""
    if not sparsity.attending or out.dim() != 3:
        return out
    rows = sparsity.token_mask(out.shape[0], out.shape[1])
    return out if rows is None else out.mul_(rows.unsqueeze(-1).to(out.dtype))


def masked_softmax(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A softmax over the keys of attention logits inside an attention layer, masked keys weighing zero (a row
    without a visible key weighs nothing); None when this softmax is not one over identifiable keys."""
    x, dim = args[0], argument(args, kwargs, 1, "dim")
    if not sparsity.attending or dim is None or dim % x.dim() != x.dim() - 1 or not sparsity.softmax_over_keys:
        return None
    keys = sparsity.key_mask(x.shape)
    if keys is None:
        return None
    weights = func(x.masked_fill(~keys, torch.finfo(x.dtype).min), *args[1:], **kwargs) * keys
    queries = sparsity.query_mask(x.shape)
    return weights if queries is None else weights * queries


def _scaled_dot_product_attention(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> Any:
    call = {name: argument(args, kwargs, i, name) for i, name in enumerate(_SDPA_ARGUMENTS)
            if len(args) > i or name in kwargs}
    query, key = call["query"], call["key"]
    if call.get("is_causal"):
        raise NoSparseVersion("causal scaled_dot_product_attention over the sites of a map has no sparse version")
    logits = (*query.shape[:-1], key.shape[-2])
    keys = sparsity.key_mask(logits)
    if keys is None:
        raise NoSparseVersion(
            f"scaled_dot_product_attention over {key.shape[-2]} keys in a batch of {query.shape[0]}: they are not "
            "the sites of a map of this pass, so masked keys cannot be left out"
        )
    given = call.get("attn_mask")
    if given is not None and given.dtype == torch.bool:
        keys = keys & given
    empty = ~keys.any(-1, keepdim=True)  # rows without a visible key: kept finite, zeroed below
    allowed = keys | empty
    additive = given is not None and given.dtype != torch.bool
    call["attn_mask"] = given.masked_fill(~allowed, -torch.inf) if additive else allowed
    out = func(**call)
    keep = ~empty
    queries = sparsity.token_mask(query.shape[0], query.shape[-2])
    if queries is not None:
        keep = keep & queries.view(queries.shape[0], *([1] * (query.dim() - 3)), queries.shape[-1], 1)
    return out * keep


def _avg_pool1d(sparsity: SparsityContext, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """Average pooling of a token sequence ``(B', C, n)`` over its visible tokens (windows without overlap)."""
    x = args[0]
    rows = sparsity.token_mask(x.shape[0], x.shape[-1]) if sparsity.attending and x.dim() == 3 else None
    if rows is None:
        return func(*args, **kwargs)
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    kernel, stride, padding, ceil_mode, _ = (argument(args, kwargs, i + 1, n) for i, n in enumerate(names))
    kernel = kernel[0] if isinstance(kernel, (tuple, list)) else kernel
    stride = kernel if not stride else (stride[0] if isinstance(stride, (tuple, list)) else stride)
    padding = padding[0] if isinstance(padding, (tuple, list)) else (padding or 0)
    if stride != kernel or padding or ceil_mode or x.shape[-1] % kernel:
        raise NoSparseVersion("average pooling of tokens with overlapping, padded or partial windows has no sparse "
                              "version")
    windows = rows.view(rows.shape[0], -1, kernel)
    share = windows.to(x.dtype).mean(-1)
    pooled = windows.any(-1)
    sparsity.declare_tokens(pooled)
    return func(*args, **kwargs) / share.clamp_min(1 / kernel).unsqueeze(1) * pooled.unsqueeze(1).to(x.dtype)


# Handlers for attention functions (merged into sparse_functions.HANDLERS).
ATTENTION_HANDLERS: Mapping[Callable, Handler] = MappingProxyType({
    F.scaled_dot_product_attention: _scaled_dot_product_attention,
    F.avg_pool1d: _avg_pool1d,
})
