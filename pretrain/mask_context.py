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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SparsityContext", "VisibleSites", "upsample_mask"]


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

    @contextlib.contextmanager
    def use(self, active: torch.Tensor | None) -> Iterator[None]:
        """Make ``active`` the mask seen by every sparse layer inside the ``with`` block."""
        self.active, self._views = active, {}
        try:
            yield
        finally:
            self.active, self._views = None, {}

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
