"""SparseEncoder: any timm convnet with four stages at strides 4/8/16/32, run submanifold-sparsely."""

from __future__ import annotations

import timm
import torch
from torch import nn

from .sparse import SparsityContext, sparsify

__all__ = ["SparseEncoder"]

FEATURE_STRIDES = (4, 8, 16, 32)


class SparseEncoder(nn.Module):
    """Wraps a timm convnet so that ``enc(x, active)`` encodes only the visible patches.

    ``x`` is ``(B, 3, H, W)`` with H and W multiples of 32; ``active`` is a bool tensor
    ``(B, 1, H/32, W/32)`` (True = visible) or ``None`` for a plain dense pass. Returns the four
    stage outputs, finest first, with shapes ``(B, channels[i], H/s, W/s)`` for s in 4, 8, 16, 32,
    each exactly zero at masked sites.

    ``self.model`` is the timm model itself (classifier removed), so its ``state_dict()`` has
    exactly the keys of ``timm.create_model(name, num_classes=0)``.

    ``backend`` chooses how convolutions and linear layers run on the visible part: ``'masked'``
    (dense, then masked; the default and fastest on dense hardware) or ``'gather'`` (computed at
    visible sites only, see :mod:`pretrain.gather`). Both give the same values.
    """

    downsample_ratio: int = FEATURE_STRIDES[-1]

    def __init__(self, model: nn.Module, backend: str = "masked") -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise ValueError(
                f"{type(model).__name__} is not a timm model with forward_intermediates(); "
                "create it with timm.create_model()"
            )
        by_stride = {info["reduction"]: info["num_chs"] for info in model.feature_info}
        missing = [s for s in FEATURE_STRIDES if s not in by_stride]
        if missing:
            raise ValueError(
                f"{type(model).__name__} has no feature maps at strides {missing}; "
                "SparK needs four stages at strides 4/8/16/32"
            )
        if model.feature_info[-1]["reduction"] != self.downsample_ratio:
            raise ValueError(f"{type(model).__name__} downsamples beyond stride 32")
        model.reset_classifier(0)
        self.model = model
        self.channels: list[int] = [by_stride[s] for s in FEATURE_STRIDES]
        self.sparsity = SparsityContext()
        self.backend = backend
        self._hooks = sparsify(model, self.sparsity, backend)

    @classmethod
    def from_name(cls, name: str, backend: str = "masked", **timm_kwargs) -> SparseEncoder:
        """Create ``timm.create_model(name, num_classes=0, **timm_kwargs)`` and wrap it."""
        return cls(timm.create_model(name, num_classes=0, **timm_kwargs), backend=backend)

    @property
    def model_name(self) -> str:
        """timm's name of the wrapped architecture (from its pretrained config)."""
        return self.model.pretrained_cfg.get("architecture", type(self.model).__name__)

    def check_inputs(self, x: torch.Tensor, active: torch.Tensor | None) -> None:
        """Raise ``ValueError`` unless ``x`` and ``active`` have compatible, supported shapes."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        batch, _, height, width = x.shape
        ratio = self.downsample_ratio
        if height % ratio or width % ratio:
            raise ValueError(f"input size {height}x{width} is not divisible by {ratio}")
        if active is None:
            return
        expected = (batch, 1, height // ratio, width // ratio)
        if tuple(active.shape) != expected:
            raise ValueError(f"mask of shape {tuple(active.shape)} does not match images: expected {expected}")
        if active.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {active.dtype}")

    def forward(self, x: torch.Tensor, active: torch.Tensor | None) -> list[torch.Tensor]:
        self.check_inputs(x, active)
        with self.sparsity.use(active):
            if active is not None:
                x = x * self.sparsity.mask(x.shape[-2], x.shape[-1], x.dtype)
            feats = self.model.forward_intermediates(x, indices=len(FEATURE_STRIDES), intermediates_only=True)
        self._check_strides(x, feats)
        return feats

    def _check_strides(self, x: torch.Tensor, feats: list[torch.Tensor]) -> None:
        strides = [x.shape[-1] // f.shape[-1] for f in feats]
        if strides != list(FEATURE_STRIDES):
            raise ValueError(f"{self.model_name} returned maps at strides {strides}, expected {list(FEATURE_STRIDES)}")
