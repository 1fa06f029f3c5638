"""The ``gather`` sparse backend: convolutions and linear layers computed at visible sites only.

The default ``masked`` backend runs every convolution densely and zeroes the masked sites of its
output. This backend evaluates a convolution only where its output is visible: the input rows a
visible output site reads (one per kernel tap, from the input in channels-last order; taps in the
padding read a clamped row and are zeroed)
are gathered into a ``(visible sites, k*k*C)`` matrix, multiplied with the weight (one GEMM, or one
batched GEMM per group for grouped and depthwise convolutions), and scattered into a zero map. A
linear layer on a channels-last feature map runs on the gathered visible tokens alone. Both give
the masked backend's values (the masked sites of a submanifold layer's input are zero, exactly what
the gather reads there). The tap indices are built once per forward pass and layer geometry; the
backward pass gathers again from the input when that is a channels-last map (kept by the network
anyway), else keeps the gathered matrix of 1x1 kernels.

The layers are rebuilt as subclasses of ``nn.Conv2d`` and ``nn.Linear`` that share the original
parameters, so state-dict keys are unchanged; with no mask set they are the plain layers, and so they are on
per-head tensors of an attention layer (EfficientFormerV2's talking heads convolve attention logits) and on
token sequences, which the masked backend's function handlers take care of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mask_context import SparsityContext

__all__ = ["GatherConv2d", "GatherLinear", "conv_taps", "gather_conv2d", "gather_linear"]


def _matches_memory_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` (channels-last strides) made contiguous when ``like`` is a plain NCHW tensor."""
    if like.is_contiguous() and not like.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous()
    return out


def conv_taps(
    out_rows: torch.Tensor, in_size: tuple[int, int], out_size: tuple[int, int], conv: nn.Conv2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input rows read by each output site in ``out_rows`` (flat ``b*oh*ow + i*ow + j``).

    Returns ``index`` ``(n * k*k,)``, flat input rows ``b*H*W + y*W + x`` tap-major within a site
    (taps outside the input clamped to the border), and ``outside``, the positions in ``index`` of
    those clamped taps, whose values must read as zero padding.
    """
    (height, width), (out_h, out_w) = in_size, out_size
    b, site = out_rows.div(out_h * out_w, rounding_mode="floor"), out_rows.remainder(out_h * out_w)
    i, j = site.div(out_w, rounding_mode="floor"), site.remainder(out_w)
    device = out_rows.device
    tap_y = torch.arange(conv.kernel_size[0], device=device) * conv.dilation[0] - conv.padding[0]
    tap_x = torch.arange(conv.kernel_size[1], device=device) * conv.dilation[1] - conv.padding[1]
    y = (i * conv.stride[0])[:, None, None] + tap_y[None, :, None]  # (n, kh, 1)
    x = (j * conv.stride[1])[:, None, None] + tap_x[None, None, :]  # (n, 1, kw)
    inside = ((y >= 0) & (y < height)) & ((x >= 0) & (x < width))
    index = b[:, None, None] * (height * width) + y.clamp(0, height - 1) * width + x.clamp(0, width - 1)
    return index.flatten(), (~inside).flatten().nonzero().squeeze(1)


class _GatherGemm(torch.autograd.Function):
    """``values[g] = tokens[index] (grouped) @ weight[g]``, rows at ``outside`` reading zero.

    For backward it keeps the tokens and gathers again when they are a view of a map that the
    network keeps anyway (``tokens_shared``: a channels-last input), else whichever is smaller: the
    gathered matrix (a 1x1 kernel reads only the visible sites) or, for larger kernels whose
    gathered matrix repeats each input k*k times, the tokens.
    """

    @staticmethod
    def forward(ctx, tokens, index, outside, weight, sites: int, tokens_shared: bool) -> torch.Tensor:
        columns = _grouped_columns(tokens, index, outside, sites, weight.shape[0])
        ctx.keep_columns = not tokens_shared and columns.numel() <= tokens.numel()
        ctx.save_for_backward(columns if ctx.keep_columns else tokens, index, outside, weight)
        ctx.sites, ctx.tokens_shape = sites, tokens.shape
        return torch.bmm(columns, weight)

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        saved, index, outside, weight = ctx.saved_tensors
        groups = weight.shape[0]
        grad_tokens = grad_weight = None
        if ctx.needs_input_grad[3]:
            columns = saved if ctx.keep_columns else _grouped_columns(saved, index, outside, ctx.sites, groups)
            grad_weight = torch.bmm(columns.transpose(1, 2), grad_values)
        if ctx.needs_input_grad[0]:
            grad_columns = torch.bmm(grad_values, weight.transpose(1, 2))  # (G, n, k*k*C/G)
            grad_columns = grad_columns.view(groups, index.numel(), -1).transpose(0, 1).reshape(index.numel(), -1)
            grad_columns.index_fill_(0, outside, 0)  # padding taps: no gradient to the clamped rows
            grad_tokens = grad_columns.new_zeros(ctx.tokens_shape).index_add_(0, index, grad_columns)
        return grad_tokens, None, None, grad_weight, None, None


def _grouped_columns(
    tokens: torch.Tensor, index: torch.Tensor, outside: torch.Tensor, sites: int, groups: int
) -> torch.Tensor:
    """The gathered rows, padding taps zeroed, as a ``(groups, sites, taps * C/groups)`` batch of matrices."""
    channels = tokens.shape[1]
    columns = tokens.index_select(0, index).index_fill_(0, outside, 0)
    columns = columns.view(sites, index.numel() // sites, groups, channels // groups)
    return columns.permute(2, 0, 1, 3).reshape(groups, sites, -1)


def gather_conv2d(
    conv: nn.Conv2d, x: torch.Tensor, out_rows: torch.Tensor, out_size: tuple[int, int],
    taps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``conv(x)`` evaluated at the output sites ``out_rows`` only and zero elsewhere.

    ``out_rows`` are flat indices ``b*oh*ow + i*ow + j`` into the ``(B, oh, ow)`` output grid;
    ``taps`` is :func:`conv_taps` for them, computed here when not given. ``conv`` must use zero
    padding and integer ``padding`` (checked by :class:`GatherConv2d`). Under autocast the GEMMs run
    in the autocast dtype, as ``F.conv2d`` would.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = out_size
    index, outside = taps if taps is not None else conv_taps(out_rows, (height, width), out_size, conv)
    tokens = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view for channels-last input
    groups, out_channels, n = conv.groups, conv.out_channels, out_rows.numel()
    # (O, kh, kw, C/G) matches the gathered order; as (G, k*k*C/G, O/G) matrices
    weight = conv.weight.permute(0, 2, 3, 1).reshape(groups, out_channels // groups, -1).transpose(1, 2)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        tokens, weight = tokens.to(dtype), weight.to(dtype)
    shared = tokens.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    with torch.autocast(device_type, enabled=False):
        values = _GatherGemm.apply(tokens, index, outside, weight, n, shared).transpose(0, 1).reshape(n, out_channels)
    if conv.bias is not None:
        values = values + conv.bias.to(values.dtype)
    out = values.new_zeros(batch * out_h * out_w, out_channels).index_copy(0, out_rows, values)
    return _matches_memory_format(out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2), x)


def gather_linear(linear: nn.Linear, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for a channels-last map ``x`` ``(B, H, W, C)``, computed at flat sites ``rows`` only."""
    batch, height, width, channels = x.shape
    values = F.linear(x.reshape(-1, channels).index_select(0, rows), linear.weight, linear.bias)
    out = values.new_zeros(batch * height * width, linear.out_features).index_copy(0, rows, values)
    return out.view(batch, height, width, linear.out_features)


class GatherConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, while its encoder holds a mask, computes at visible output sites only."""

    sparsity: SparsityContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparsity.enabled or self.sparsity.is_per_head(x):  # attention logits mixed across heads
            return super().forward(x)
        out_size = tuple(
            (size + 2 * pad - dil * (k - 1) - 1) // s + 1
            for size, pad, dil, k, s in zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)
        )
        in_size = (x.shape[-2], x.shape[-1])
        out_rows = self.sparsity.visible_index(*out_size)
        geometry = ("conv-taps", in_size, self.kernel_size, self.stride, self.padding, self.dilation)
        taps = self.sparsity.cached(geometry, lambda: conv_taps(out_rows, in_size, out_size, self))
        return gather_conv2d(self, x, out_rows, out_size, taps)


class GatherLinear(nn.Linear):
    """``nn.Linear`` that, on a channels-last feature map while a mask is set, runs on visible tokens only."""

    sparsity: SparsityContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparsity.enabled or x.dim() != 4 or self.sparsity.is_per_head(x):
            return super().forward(x)
        return gather_linear(self, x, self.sparsity.visible_index(x.shape[1], x.shape[2]))


def gatherable(module: nn.Module) -> type | None:
    """The gather class for ``module`` if it is exactly a plain ``nn.Conv2d``/``nn.Linear`` it can run."""
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None  # 'same' padding and reflect/replicate/circular modes stay on the masked path
        return GatherConv2d
    if type(module) is nn.Linear:
        return GatherLinear
    return None
