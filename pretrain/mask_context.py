"""The patch mask of one sparse forward pass, and its views at every feature-map resolution.

Both the sparse layers (:mod:`pretrain.sparse`, :mod:`pretrain.gather`) and the function mode that makes
the functional parts of a forward sparse (:mod:`pretrain.sparse_functions`) read the mask from here; this
module imports neither of them.

A feature map of size ``(H, W)`` gets its mask from the ``(h, w)`` patch grid in one of three ways:

- finer maps (``H = s*h``, ``W = s*w``, the maps of a convnet at strides up to the patch size): nearest
  upsampling, each site inherits its patch's visibility;
- coarser maps (``h = f*H``, ``w = f*W``, or ``1x1``: the output of a global pool, or the half-resolution
  branch of GhostNetV2's attention): a site is visible when any patch it covers is visible, so a pooled
  vector is kept exactly when its sample has a visible patch;
- maps padded by ``F.pad`` during this pass (e.g. HGNetV2's stem pads ``32x32`` to ``33x33`` on the right and
  bottom before a pool): the mask of the unpadded map, padded the same way with visible sites, so every
  site keeps its real position and the padding keeps its own value, as in the dense model. Registered by
  :meth:`SparsityContext.register_padding`.

Any other size does not line up with the patches and is refused (``ValueError``).

Attention layers see sites as tokens: a sequence of ``n`` tokens is the row-major flattening of the one map
size with ``n`` sites (:meth:`SparsityContext.token_size`). While an attention layer runs, it opens a
:class:`TokenScope` (:meth:`SparsityContext.attention`) that may add what the size alone cannot tell: token
sequences in another order (patches folded into the batch, tokens pooled in raster order), keys gathered
into windows, and how many heads are folded into the batch dimension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SparsityContext", "TokenScope", "VisibleSites", "upsample_mask"]


def upsample_mask(active: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest upsampling of a patch mask ``(B, 1, h, w)`` to ``size`` (integer multiples of h and w)."""
    scale_h, scale_w = size[0] // active.shape[-2], size[1] // active.shape[-1]
    return active.repeat_interleave(scale_h, dim=-2).repeat_interleave(scale_w, dim=-1)


def _downsample_mask(active: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A coarse mask: a site of ``size`` is visible when any patch it covers is (``size`` divides the grid)."""
    batch, _, grid_h, grid_w = active.shape
    height, width = size
    blocks = active.view(batch, 1, height, grid_h // height, width, grid_w // width)
    return blocks.any(dim=5).any(dim=3)


@dataclass(frozen=True)
class VisibleSites:
    """A count ``n`` of visible sites and the factors sparse BatchNorm derives from it, 0-dim float64
    tensors (exact factors for float64 models; a 0-dim tensor does not change the dtype of the
    statistics it multiplies), computed once per resolution and forward pass rather than per layer."""

    count: torch.Tensor
    inv_count: torch.Tensor  # 1 / n
    unbiased: torch.Tensor  # n / (n - 1): Bessel's correction of the running variance
    ratio: torch.Tensor | None = None  # N / n, N the number of all sites (for statistics of one rank)
    excess: torch.Tensor | None = None  # N / n - 1

    @classmethod
    def of(cls, count: torch.Tensor, total: int | None = None) -> VisibleSites:
        """Factors of ``count`` visible sites out of ``total`` (ratio and excess only when given)."""
        count = count.to(torch.float64)
        n = count.clamp_min(1.0)
        inv_count = n.reciprocal()
        ratio = None if total is None else inv_count * total
        return cls(count, inv_count, n / (n - 1).clamp_min(1.0), ratio, None if ratio is None else ratio - 1)


@dataclass
class TokenScope:
    """What one attention layer declares about its tokens while it runs (see :meth:`SparsityContext.attention`).

    ``heads``: the number of attention heads; per-head tensors ``(B, heads, ...)`` are not feature maps, and
    a batch of ``B * heads`` (batch-major) is the batch with its heads folded in. ``tokens``: visibility
    ``(B', n)`` of token sequences of length ``n`` whose order is not the row-major order of a map (added by
    the layer, or by a pool inside it). ``keys``: visibility of the keys of each query's window, a bool tensor
    whose last dimension is the number of keys per window and that broadcasts against the attention logits
    once the heads are folded into its first dimension; ``queries`` likewise for the queries of each window (size
    1 on the keys' dimension). ``query_dim``: the dimension of the logits that runs over queries (-2 for
    ``q @ k^T``). ``softmax_over_keys``: whether a softmax over the last dimension in this layer is one over keys
    (False for attention between channels, whose softmax is not).
    """

    heads: int | None = None
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    query_dim: int = -2
    softmax_over_keys: bool = True


class SparsityContext:
    """The patch mask of the current forward pass and its views at every feature resolution.

    ``active`` is a bool tensor ``(B, 1, h, w)`` on the patch grid (True = visible). Views at a
    resolution are computed once per forward pass (and dtype), see the module docstring for which
    resolutions have one.
    """

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None
        self.sync_batchnorm: bool = True
        self._views: dict[tuple, Any] = {}
        self._scopes: list[TokenScope] = []

    @contextlib.contextmanager
    def use(self, active: torch.Tensor | None) -> Iterator[None]:
        """Make ``active`` the mask seen by every sparse layer inside the ``with`` block."""
        self.active, self._views, self._scopes = active, {}, []
        try:
            yield
        finally:
            self.active, self._views, self._scopes = None, {}, []

    @property
    def enabled(self) -> bool:
        return self.active is not None

    @property
    def batch_size(self) -> int:
        """The batch size of the current mask."""
        return self.active.shape[0]

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, evaluated once per forward pass for each ``key`` (the mask views below, and
        index tensors that layers such as :mod:`pretrain.gather` derive from the mask)."""
        if key not in self._views:
            self._views[key] = compute()
        return self._views[key]

    def _scale(self, height: int, width: int) -> str | None:
        """How a map of ``(height, width)`` relates to the patch grid: 'padded', 'up', 'down' or None."""
        if ("padded", height, width) in self._views:
            return "padded"
        grid_h, grid_w = self.active.shape[-2:]
        if height % grid_h == 0 and width % grid_w == 0 and height // grid_h == width // grid_w:
            return "up"
        if (height, width) == (1, 1) or (grid_h % height == 0 and grid_w % width == 0
                                          and grid_h // height == grid_w // width):
            return "down"
        return None

    def lines_up(self, height: int, width: int) -> bool:
        """Whether a map of ``(height, width)`` has a mask in this pass (see the module docstring)."""
        return self._scale(height, width) is not None

    def is_coarse(self, height: int, width: int) -> bool:
        """Whether ``(height, width)`` is coarser than the patch grid (e.g. the 1x1 output of a global pool)."""
        return self._scale(height, width) == "down" and (height, width) != tuple(self.active.shape[-2:])

    def bool_mask(self, height: int, width: int) -> torch.Tensor:
        """The bool mask ``(B, 1, H, W)`` at ``(height, width)``."""
        return self.cached(("bool", height, width), lambda: self._resample(height, width))

    def _resample(self, height: int, width: int) -> torch.Tensor:
        scale = self._scale(height, width)
        if scale == "padded":
            return self._views[("padded", height, width)]
        if scale == "up":
            return upsample_mask(self.active, (height, width))
        if scale == "down":
            return _downsample_mask(self.active, (height, width))
        grid_h, grid_w = self.active.shape[-2:]
        raise ValueError(
            f"feature map of size {height}x{width} does not line up with the {grid_h}x{grid_w} patch grid "
            "(neither a whole up- or downsampling of it nor a padded copy of such a map)"
        )

    def register_padding(self, size: tuple[int, int], pad: Sequence[int]) -> None:
        """Record that a map of ``size`` was padded by ``pad`` (``F.pad`` order: left, right, top, bottom;
        negative values crop), so that the padded map's mask is the padded mask (padding visible).

        Maps are told apart by their size alone, so a padded size that already has a different mask in this
        pass (a size of the network's own maps, e.g. 32 from 30, or another padding to the same size) raises
        ``ValueError``; the same mask reached twice is fine (HGNetV2 pads two maps alike).
        """
        left, right, top, bottom = (list(pad) + [0, 0])[:4]
        height, width = size[0] + top + bottom, size[1] + left + right
        padded = F.pad(self.bool_mask(*size).to(torch.uint8), (left, right, top, bottom), value=1).bool()
        taken = ("padded", height, width) in self._views or ("bool", height, width) in self._views
        if not taken and not self._is_network_size(height, width):
            self._views[("padded", height, width)] = padded
            return
        if not torch.equal(self.bool_mask(height, width), padded):
            raise ValueError(
                f"padding a {size[0]}x{size[1]} map to {height}x{width} is ambiguous: maps of that size already "
                "have another mask in this pass"
            )

    def _is_network_size(self, height: int, width: int) -> bool:
        """Whether ``(height, width)`` is the grid upsampled by a power of two (the size of a stage's maps)."""
        scale = height // self.active.shape[-2]
        return self._scale(height, width) == "up" and scale & (scale - 1) == 0

    def note_flattened(self, flat: torch.Tensor, size: tuple[int, int]) -> None:
        """Remember, for this pass, that ``flat`` ``(B, C', H*W)`` holds the positions of a map of ``size``."""
        self._views[("flattened", id(flat))] = (flat, size)

    def flattened_size(self, x: torch.Tensor) -> tuple[int, int] | None:
        """The map size ``(H, W)`` that ``x`` is a flattened copy of (see :meth:`note_flattened`), else None."""
        entry = self._views.get(("flattened", id(x)))
        return entry[1] if entry is not None and entry[0] is x else None

    def mask(
        self, height: int, width: int, dtype: torch.dtype, channels_last: bool = False
    ) -> torch.Tensor:
        """The mask at ``(height, width)`` as ``(B, 1, H, W)`` or, channels-last, ``(B, H, W, 1)``."""

        def compute() -> torch.Tensor:
            mask = self.bool_mask(height, width).to(dtype)
            return mask.permute(0, 2, 3, 1) if channels_last else mask

        return self.cached(("float", height, width, dtype, channels_last), compute)

    def visible_sites(self, height: int, width: int) -> VisibleSites:
        """The number of visible sites in the whole batch at ``(height, width)`` and its factors."""

        def compute() -> VisibleSites:
            visible = self.bool_mask(height, width)
            return VisibleSites.of(visible.sum(dtype=torch.float64), visible.numel())

        return self.cached(("sites", height, width), compute)

    def visible_index(self, height: int, width: int) -> torch.Tensor:
        """Flat indices ``b*H*W + i*W + j`` of the visible sites at ``(height, width)``, ascending."""
        return self.cached(
            ("index", height, width), lambda: self.bool_mask(height, width).flatten().nonzero().squeeze(1)
        )

    def visible_per_sample(self, height: int, width: int) -> torch.Tensor:
        """Number of visible sites of each sample at ``(height, width)``, shape ``(B,)`` float."""
        return self.cached(("count", height, width), lambda: self.bool_mask(height, width).flatten(1).sum(1).float())

    # --- tokens: the sites of a map as a sequence, inside attention layers -----------------------------------

    def token_size(self, count: int) -> tuple[int, int] | None:
        """The map size ``(H, W)`` with ``count`` sites that lines up with the patch grid (a whole up- or
        downsampling of it), or None. At most one size has a given number of sites."""
        grid_h, grid_w = self.active.shape[-2:]
        if count == 1:
            return (1, 1)
        if count % (grid_h * grid_w) == 0:
            scale = round((count // (grid_h * grid_w)) ** 0.5)
            if scale * scale * grid_h * grid_w == count:
                return (scale * grid_h, scale * grid_w)
            return None
        if (grid_h * grid_w) % count == 0:
            factor = round(((grid_h * grid_w) // count) ** 0.5)
            if factor * factor * count == grid_h * grid_w and grid_h % factor == 0 and grid_w % factor == 0:
                return (grid_h // factor, grid_w // factor)
        return None

    @contextlib.contextmanager
    def attention(self, scope: TokenScope) -> Iterator[TokenScope]:
        """Declare ``scope`` for the duration of one attention layer's forward (scopes nest)."""
        self._scopes.append(scope)
        try:
            yield scope
        finally:
            self._scopes.pop()

    @property
    def attending(self) -> bool:
        """Whether an attention layer's forward is running (a :class:`TokenScope` is open)."""
        return bool(self._scopes)

    @property
    def softmax_over_keys(self) -> bool:
        """Whether the innermost open scope's softmaxes over the last dimension weigh keys."""
        return self._scopes[-1].softmax_over_keys

    @property
    def windowed(self) -> bool:
        """Whether the innermost open scope declares the keys of windows (blocked local attention)."""
        return bool(self._scopes) and self._scopes[-1].keys is not None

    def _heads(self) -> int | None:
        return next((s.heads for s in reversed(self._scopes) if s.heads is not None), None)

    def token_mask(self, batch: int, count: int) -> torch.Tensor | None:
        """Visibility ``(batch, count)`` of a token sequence of length ``count`` in a batch of ``batch``, or None
        when nothing says which sites its tokens are.

        Sequences declared by the open scopes come first; otherwise the tokens are the row-major sites of the map
        with ``count`` sites (:meth:`token_size`). The batch is this pass's, or the declared sequences' own, or
        either with the declared heads folded in (batch-major).
        """
        declared = next((s.tokens[count] for s in reversed(self._scopes) if count in s.tokens), None)
        if declared is None:
            size = self.token_size(count)
            if size is None:
                return None
            declared = self.cached(("tokens", count), lambda: self.bool_mask(*size).reshape(self.batch_size, count))
        return self._fold(declared, batch)

    def _fold(self, mask: torch.Tensor, batch: int) -> torch.Tensor | None:
        """``mask`` for a batch of ``batch``: itself, or repeated for the heads folded into the batch."""
        if mask.shape[0] == batch:
            return mask
        heads = self._heads()
        if heads is not None and batch == mask.shape[0] * heads:
            return mask.repeat_interleave(heads, dim=0)
        return None

    def declare_tokens(self, mask: torch.Tensor) -> None:
        """Add a token sequence's visibility ``(B', n)`` to the innermost open scope (e.g. a pool's output)."""
        self._scopes[-1].tokens[mask.shape[-1]] = mask

    def key_mask(self, logits: Sequence[int]) -> torch.Tensor | None:
        """Which keys each row of attention logits of shape ``logits`` (keys last) may see, as a bool tensor that
        broadcasts against them; None when the keys cannot be identified as sites. Declared windows first, then
        the token sequences of :meth:`token_mask`."""
        for scope in reversed(self._scopes):
            keys = scope.keys
            if keys is not None and keys.shape[-1] == logits[-1] and keys.dim() == len(logits):
                return self._fold(keys, logits[0])
        tokens = self.token_mask(logits[0], logits[-1])
        if tokens is None:
            return None
        return tokens.view(tokens.shape[0], *([1] * (len(logits) - 2)), tokens.shape[-1])

    def query_mask(self, logits: Sequence[int]) -> torch.Tensor | None:
        """Which rows of attention logits of shape ``logits`` are visible queries, as a bool tensor that broadcasts
        against them; None when the queries cannot be identified as sites (then their rows are left as they are:
        the layer's output at masked sites is zeroed downstream)."""
        for scope in reversed(self._scopes):
            queries = scope.queries
            if queries is not None and queries.dim() == len(logits) and queries.shape[-2] == logits[-2]:
                return self._fold(queries, logits[0])
        query_dim = self._scopes[-1].query_dim % len(logits)
        tokens = self.token_mask(logits[0], logits[query_dim])
        if tokens is None:
            return None
        shape = [1] * len(logits)
        shape[0], shape[query_dim] = tokens.shape
        return tokens.view(shape)

    def is_per_head(self, x: Any) -> bool:
        """Whether ``x`` is a per-head tensor ``(B, heads, ...)`` of the open attention scope (logits, or queries,
        keys and values split by head), which is never a feature map even when its last two sizes line up."""
        heads = self._heads()
        return (heads is not None and isinstance(x, torch.Tensor) and x.dim() == 4
                and x.shape[0] == self.batch_size and x.shape[1] == heads)
