"""LightDecoder: the light UNet decoder of SparK's appendix A."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LightDecoder", "UpsampleBlock"]


class UpsampleBlock(nn.Sequential):
    """One 2x step: ConvTranspose2d(k4, s2, p1) then two 3x3 conv + BN, ReLU6 between.

    ``(B, cin, H, W) -> (B, cout, 2H, 2W)``.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True),
            nn.Conv2d(cin, cin, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )


class LightDecoder(nn.Module):
    """UNet-style decoder from the stride-``upsample_ratio`` map up to a 3-channel image.

    ``widths[i] = width // 2**i`` is the number of channels entering block i; block i doubles the
    resolution and halves the width. ``forward(to_dec)`` takes the densified maps coarsest first
    (``to_dec[i]`` of shape ``(B, widths[i], H/r*2**i, W/r*2**i)``, entries may be None) and adds
    each before its block, as in equation (2) of the paper. Output: ``(B, 3, H, W)``.
    """

    def __init__(self, width: int = 768, upsample_ratio: int = 32) -> None:
        super().__init__()
        steps = round(math.log2(upsample_ratio))
        if 2**steps != upsample_ratio:
            raise ValueError(f"upsample_ratio must be a power of two, got {upsample_ratio}")
        if width % 2**steps:
            raise ValueError(f"width {width} must be divisible by {2**steps}")
        self.width = width
        self.upsample_ratio = upsample_ratio
        self.widths: list[int] = [width // 2**i for i in range(steps + 1)]
        self.blocks = nn.ModuleList(UpsampleBlock(cin, cout) for cin, cout in zip(self.widths[:-1], self.widths[1:]))
        self.proj = nn.Conv2d(self.widths[-1], 3, kernel_size=1, bias=True)

    def forward(self, to_dec: list[torch.Tensor | None]) -> torch.Tensor:
        if len(to_dec) > len(self.blocks) or to_dec[0] is None:
            raise ValueError("to_dec must start with the coarsest map and have at most one map per block")
        x = to_dec[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(to_dec) and to_dec[i] is not None:
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)
