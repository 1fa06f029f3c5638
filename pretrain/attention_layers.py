"""Attention layers of timm, rebuilt so that while they run the function mode knows what their tokens are.

Each class here is a subclass of a timm attention layer (or of a block that folds sites into tokens) whose
``forward`` opens a :class:`pretrain.mask_context.TokenScope` and then runs timm's own ``forward`` unchanged;
the arithmetic is made sparse by the handlers of :mod:`pretrain.sparse_attention` and
:mod:`pretrain.sparse_functions`. The scope says:

- how many heads the layer folds into per-head tensors or into the batch (every layer with ``num_heads``), so
  that logits ``(B, heads, Nq, Nk)`` are not mistaken for feature maps and a softmax over ``(B*heads, Nq, Nk)``
  finds its keys;
- for halo attention, the keys of each block's window: the window's visible sites plus the zero padding around
  the map, which the dense layer attends to as well (so every key it sees is kept, except masked sites), and the
  queries of each block;
- for MobileViT's block, the order of the sites once its patches are folded into the batch (``B * P`` sequences
  of the ``N`` patches), which must line up with the patch grid (a map that MobileViT resamples to fit its
  patches is refused: resampling moves sites);
- for cross-covariance attention (EdgeNeXt), that its softmax is over channels, not keys.

Layers not listed here but calling ``scaled_dot_product_attention`` on the tokens of a map work from the
sequence length alone; anything else that folds sites into the batch is refused by the function mode.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .mask_context import SparsityContext, TokenScope
from .site_maps import NoSparseVersion

__all__ = ["SCOPED_LAYERS", "ScopedAttention", "named_class"]


class ScopedAttention(nn.Module):
    """Mixin for a timm attention layer: ``forward`` runs inside the layer's :class:`TokenScope` while the
    encoder holds a mask, and is timm's ``forward`` untouched otherwise."""

    sparsity: SparsityContext
    token_scope: Callable[[nn.Module, SparsityContext, torch.Tensor], TokenScope]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.sparsity.enabled:
            return super().forward(x, *args, **kwargs)
        with self.sparsity.attention(type(self).token_scope(self, self.sparsity, x)):
            return super().forward(x, *args, **kwargs)


def _heads(layer: nn.Module, sparsity: SparsityContext, x: torch.Tensor) -> TokenScope:
    """Attention over the tokens of one map: only the number of heads needs saying."""
    return TokenScope(heads=getattr(layer, "num_heads", None))


def _heads_then_queries(layer: nn.Module, sparsity: SparsityContext, x: torch.Tensor) -> TokenScope:
    """Multi-query attention written as einsums with logits ``(B, queries, heads, keys)``."""
    return TokenScope(heads=layer.num_heads, query_dim=1)


def _channels(layer: nn.Module, sparsity: SparsityContext, x: torch.Tensor) -> TokenScope:
    """Attention between channels (cross-covariance): statistics over tokens, a softmax over channels."""
    return TokenScope(heads=getattr(layer, "num_heads", None), softmax_over_keys=False)


def _halo_windows(layer: nn.Module, sparsity: SparsityContext, x: torch.Tensor) -> TokenScope:
    """Blocked local attention with a halo: the keys of each block's window ``(B, blocks, 1, win*win)`` and its
    queries ``(B, blocks, q*q, 1)`` (``q`` sites per block side once the layer's query stride is applied)."""
    batch, _, height, width = x.shape
    halo, block, window = layer.halo_size, layer.block_size, layer.win_size
    padded = torch.ones(batch, height + 2 * halo, width + 2 * halo, dtype=torch.bool, device=x.device)
    padded[:, halo:halo + height, halo:halo + width] = sparsity.bool_mask(height, width)[:, 0]
    windows = padded.unfold(1, window, block).unfold(2, window, block)  # (B, blocks_h, blocks_w, win, win)
    keys = windows.reshape(batch, -1, 1, window * window)
    side, stride = layer.block_size_ds, layer.block_stride
    queries = sparsity.bool_mask(height // stride, width // stride)[:, 0].unfold(1, side, side).unfold(2, side, side)
    return TokenScope(heads=layer.num_heads, keys=keys, queries=queries.reshape(batch, -1, side * side, 1))


def _folded_patches(layer: nn.Module, sparsity: SparsityContext, x: torch.Tensor) -> TokenScope:
    """MobileViT: patches of ``ph x pw`` sites folded into the batch, each of the ``ph*pw`` sequences holding one
    site of every patch, patches in row-major order."""
    batch, _, height, width = x.shape
    patch_h, patch_w = layer.patch_size
    if height % patch_h or width % patch_w:
        raise NoSparseVersion(
            f"MobileViT resamples a {height}x{width} map to fit its {patch_h}x{patch_w} patches, which moves sites"
        )
    visible = sparsity.bool_mask(height, width).view(batch, height // patch_h, patch_h, width // patch_w, patch_w)
    folded = visible.permute(0, 2, 4, 1, 3).reshape(batch * patch_h * patch_w, -1)
    return TokenScope(tokens={folded.shape[-1]: folded})


# timm classes made sparse, "module:Class" -> the scope they declare; classes missing from the installed timm
# are skipped.
_SCOPES: Mapping[str, Callable[[nn.Module, SparsityContext, torch.Tensor], TokenScope]] = MappingProxyType({
    "timm.layers.attention:Attention": _heads,
    "timm.layers.attention2d:Attention2d": _heads,
    "timm.layers.attention2d:MultiQueryAttention2d": _heads,
    "timm.layers.attention2d:MultiQueryAttentionV2": _heads_then_queries,
    "timm.layers.bottleneck_attn:BottleneckAttn": _heads,
    "timm.layers.halo_attn:HaloAttn": _halo_windows,
    "timm.models.edgenext:CrossCovarianceAttn": _channels,
    "timm.models.fastvit:Attention": _heads,
    "timm.models.swiftformer:EfficientAdditiveAttention": _heads,
    "timm.models.efficientformer:Attention": _heads,
    "timm.models.efficientformer_v2:Attention2d": _heads,
    "timm.models.efficientformer_v2:Attention2dDownsample": _heads,
    "timm.models.nextvit:EfficientAttention": _heads,
    "timm.models.metaformer:Attention": _heads,
    "timm.models.mobilevit:MobileVitBlock": _folded_patches,
})


def named_class(spec: str) -> type | None:
    """The class named ``"module:Class"``, or None when the installed packages do not have it."""
    module_name, _, class_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None


def _build(specs: Mapping[str, Callable]) -> Mapping[type, type]:
    """For each class named in ``specs`` that exists, its scoped subclass ``Sparse<Class>``."""
    built = {}
    for spec, scope in specs.items():
        cls = named_class(spec)
        if cls is not None:
            name = f"Sparse{cls.__name__}"
            attrs = {"token_scope": staticmethod(scope), "__module__": __name__, "__qualname__": name}
            built[cls] = type(name, (ScopedAttention, cls), attrs)
    return MappingProxyType(built)


# timm class -> its scoped subclass (exact class match), for pretrain.sparse.sparsify.
SCOPED_LAYERS: Mapping[type, type] = _build(_SCOPES)
