"""SparseEncoder: any timm convnet with four stages at strides 4/8/16/32, run submanifold-sparsely."""

from __future__ import annotations

import contextlib

import timm
import torch
from torch import nn

from .mask_context import SparsityContext, upsample_mask
from .sparse import sparsify
from .sparse_functions import NoSparseVersion, SparseFunctionMode

__all__ = ["FEATURE_STRIDES", "SparseEncoder"]

FEATURE_STRIDES = (4, 8, 16, 32)
PROBE_GRID = 2  # patches per side of the input that a new encoder runs once to check the model (64 px)


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

    While ``forward`` runs with a mask, a :class:`~pretrain.sparse_functions.SparseFunctionMode` makes the
    functional part of every block sparse too (global means and pools inside blocks average visible sites,
    padded stems keep their sites' positions, ...). A model that cannot run sparsely is refused here, when
    the encoder is built: a layer without a sparse version (``NotImplementedError``), or a sparse pass on a
    small probe input (``PROBE_GRID`` patches per side, or the model's fixed input size) that fails or writes
    to masked sites (``ValueError``), each with a one-line reason.
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
        sparsify(model, self.sparsity, backend)
        self._probe()

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
        functions = SparseFunctionMode(self.sparsity) if active is not None else contextlib.nullcontext()
        with self.sparsity.use(active), functions:
            if active is not None:
                x = x * self.sparsity.mask(x.shape[-2], x.shape[-1], x.dtype)
            feats = self.model.forward_intermediates(x, indices=len(FEATURE_STRIDES), intermediates_only=True)
        self._check_strides(x, feats)
        return feats

    def _probe_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A small input (two samples, checkerboard masks of opposite phase) on the model's device and dtype."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        channels, *size = cfg.get("input_size", (3, 224, 224))
        if not cfg.get("fixed_input_size"):
            size = [PROBE_GRID * self.downsample_ratio] * 2
        grid_h, grid_w = (s // self.downsample_ratio for s in size)
        weight = next(self.model.parameters())
        x = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0)).to(weight)
        parity = (torch.arange(grid_h)[:, None] + torch.arange(grid_w)[None, :]) % 2
        active = torch.stack([parity == 0, parity == 1]).unsqueeze(1).to(weight.device)
        return x, active

    def _probe(self) -> None:
        """Run one sparse pass on a small input (eval mode, no gradients, nothing kept) so that a model this
        encoder cannot run sparsely is refused now, with a one-line reason. A probe input the model cannot
        even take densely (a size or channel count it does not accept) checks nothing. On the meta device
        (a model built only to inspect it) the pass is dry: shapes and the functions used are checked, values
        are not, and what the meta device cannot compute is no reason to refuse."""
        x, active = self._probe_input()
        dry = x.device.type == "meta"
        training = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                try:
                    feats = self(x, active)
                except Exception as err:  # any failure of the sparse pass refuses the model
                    if (dry and not isinstance(err, (ValueError, NoSparseVersion))) or not self._runs_densely(x):
                        return
                    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                    refusal = NotImplementedError if isinstance(err, NotImplementedError) else ValueError
                    raise refusal(f"{self.model_name} cannot run sparsely: {reason}") from err
        finally:
            for module, mode in training.items():
                module.training = mode
        for stride, feat in zip(FEATURE_STRIDES, feats, strict=True):
            if not dry and torch.count_nonzero(feat * ~upsample_mask(active, feat.shape[-2:])):
                raise ValueError(
                    f"{self.model_name} cannot run sparsely: its stride-{stride} map is not zero at masked sites "
                    "(a layer writes to them that has no sparse version)"
                )

    def _runs_densely(self, x: torch.Tensor) -> bool:
        """Whether a plain dense pass on ``x`` works."""
        try:
            self(x, None)
        except Exception:  # only whether it runs matters
            return False
        return True

    def _check_strides(self, x: torch.Tensor, feats: list[torch.Tensor]) -> None:
        strides = [x.shape[-1] // f.shape[-1] for f in feats]
        if strides != list(FEATURE_STRIDES):
            raise ValueError(f"{self.model_name} returned maps at strides {strides}, expected {list(FEATURE_STRIDES)}")
