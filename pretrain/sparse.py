"""Submanifold-sparse execution of an unmodified timm convnet: the layers with state or memory tricks.

The sparse semantics are realised on dense tensors whose masked sites are exactly zero: every operation
that could write a non-zero value to a masked site is followed by a multiplication with the patch mask at
its output resolution, and every operation that mixes sites (BatchNorm statistics, pooling, global means,
attention pooling) only reads visible sites. Pointwise activations keep zeros at zero.

No timm class is edited. Two mechanisms share the work:

- this module rebuilds the layers that keep state or need a custom backward (BatchNorm, whose statistics
  and running statistics cover visible sites only, and ``nn.MaxPool2d``, which keeps no filled copy of its
  input) as subclasses that share the original parameters and buffers, so ``state_dict`` keys are untouched;
  with ``backend='gather'``, plain convolutions and linear layers are rebuilt as well (:mod:`pretrain.gather`);
- everything else, the stateless layers and whatever a block's ``forward`` computes with functions
  (``x.mean((2, 3))``, ``F.adaptive_avg_pool2d``, ``F.pad``, a softmax over positions), is handled by
  :class:`pretrain.sparse_functions.SparseFunctionMode`, which the encoder enters during its forward pass.

Attention layers are rebuilt as scoped subclasses (:mod:`pretrain.attention_layers`) that declare what their
tokens are while timm's own ``forward`` runs; ``nn.BatchNorm1d`` on a token sequence (NextViT's pooled keys)
normalises over its visible tokens. The mask lives in a :class:`pretrain.mask_context.SparsityContext` owned by
one encoder instance and is set only for the duration of that encoder's forward pass. Layers that mix sites in a
way no mechanism makes sparse are refused by :func:`sparsify`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers import activations as timm_act
from torch import nn
from torch.nn.modules.utils import _pair

from .attention_layers import SCOPED_LAYERS, named_class
from .gather import gatherable
from .mask_context import SparsityContext, VisibleSites, upsample_mask
from .site_maps import NoSparseVersion, fill_masked

__all__ = [
    "BACKENDS",
    "SparsityContext",
    "SparseBatchNorm1d",
    "SparseBatchNorm2d",
    "SparseBatchNormAct2d",
    "SparseMaxPool2d",
    "VisibleSites",
    "masked_batch_norm",
    "rebuild_as",
    "sparsify",
    "unsupported_reason",
    "upsample_mask",
]


def _process_group_size(sync: bool) -> int:
    """World size to synchronise statistics over (1 when not distributed or ``sync`` is off)."""
    if sync and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_site_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` over all its sites, in float32 (float64 for
    float64 input), from ATen's fused statistics pass."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # the CPU kernel returns reduced-precision statistics unless given float32 running buffers
        # (which momentum 0 leaves unchanged); the CUDA kernel always returns float32
        channels = x.shape[1]
        buffers = (x.new_zeros(channels, dtype=torch.float32), x.new_ones(channels, dtype=torch.float32))
        return torch.batch_norm_update_stats(x, *buffers, 0.0)
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def _visible_mean_var(
    x: torch.Tensor, sites: VisibleSites, world: int
) -> tuple[torch.Tensor, torch.Tensor, VisibleSites]:
    """Per-channel mean and biased variance of ``x`` over its visible sites, and the visible sites of
    all ranks.

    ``x`` is zero at masked sites, so the statistics over all N sites give them: with r = N / n,
    mean = r * mean_all and var = r * var_all - r * (r - 1) * mean_all^2 (exact at r = 1). Across
    ranks the per-rank (count, mean, var) are combined with Chan's parallel formula.
    """
    mean_all, var_all = _all_site_stats(x)
    mean = mean_all * sites.ratio
    var = torch.addcmul(var_all * sites.ratio, mean, mean_all * sites.excess, value=-1).clamp_min_(0.0)
    if world == 1:
        return mean, var, sites
    local = torch.cat([sites.count.reshape(1).to(mean.dtype), mean, var])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    stats = torch.stack(gathered)  # (world, 1 + 2C)
    counts, means, variances = stats[:, :1], stats[:, 1 : 1 + mean.numel()], stats[:, 1 + mean.numel() :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean).square())).sum(0) / total
    return mean, var, VisibleSites.of(total)


class _MaskedBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over visible sites, built on ATen's fused BatchNorm kernels.

    Forward: visible-site statistics from one statistics pass, then the eval-mode BatchNorm kernel
    with them and a mask multiply. Backward: ATen's BatchNorm backward reductions on the masked
    gradient give the weight and bias gradients; the input gradient (training-mode BatchNorm over the
    n visible sites) is then formed in place in the masked-gradient buffer. Saves only the input and
    per-channel vectors, like ``nn.BatchNorm2d``. With ``world > 1`` the statistics and the sums of
    the gradient are reduced over ranks (as SyncBatchNorm does). The per-channel arithmetic is kept
    to few operations: on a GPU each one is a kernel launch.
    """

    @staticmethod
    def forward(ctx, x, mask, sites: VisibleSites, weight, bias, eps: float, world: int, bn):
        mean, var, sites = _visible_mean_var(x, sites, world)
        if bn is not None:
            _update_running_stats(bn, mean, var, sites)
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps).mul_(mask)
        ctx.save_for_backward(x, mask, mean, var, weight, sites.inv_count)
        ctx.eps, ctx.world = eps, world
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, mean, var, weight, inv_count = ctx.saved_tensors
        inv_std = torch.rsqrt(var + ctx.eps)
        scale = inv_std if weight is None else inv_std * weight
        grad = grad_out * mask  # becomes grad_x in place below
        # the reductions only: sum(g * x_hat) and sum(g) with x_hat = (x - mean) * inv_std, which do not
        # depend on the weight's value; a weight must be passed all the same (without one, the CUDA
        # kernel returns empty sums)
        _, sum_gx_hat, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad, x, scale, None, None, mean, inv_std, True, ctx.eps, [False, True, True]
        )
        grad_weight = sum_gx_hat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        grad_bias = sum_g.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[4] else None
        if ctx.world > 1:
            sums = torch.stack([sum_g, sum_gx_hat]).to(mean.dtype)
            dist.all_reduce(sums)
            sum_g, sum_gx_hat = sums
        # grad_x = scale * (g - mean(g) - x_hat * mean(g * x_hat)) over the n visible sites, 0 elsewhere;
        # with x = 0 at masked sites that is scale * g - a * x - b * mask
        scale_over_n = scale * inv_count
        a = scale_over_n * inv_std * sum_gx_hat
        b = torch.addcmul(scale_over_n * sum_g, a, mean, value=-1)
        grad.mul_(scale.to(x.dtype).view(-1, 1, 1))
        grad.addcmul_(x, a.to(x.dtype).view(-1, 1, 1), value=-1)
        grad.addcmul_(mask, b.to(x.dtype).view(-1, 1, 1), value=-1)
        return grad, None, None, grad_weight, grad_bias, None, None, None


def masked_batch_norm(
    bn: nn.modules.batchnorm._BatchNorm,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    sync: bool = True,
    sites: VisibleSites | None = None,
) -> torch.Tensor:
    """BatchNorm of ``x`` (B, C, H, W) with statistics over the sites where ``mask`` is 1.

    ``x`` must already be zero at masked sites; ``mask`` is ``(B, 1, H, W)`` in ``x``'s dtype, or None
    when every site is visible (then the plain BatchNorm kernel runs unless ranks must sync);
    ``sites`` is the mask's :class:`VisibleSites` when the caller has it already. In training mode
    (or without running stats) the batch statistics are those of the visible sites alone, summed
    over ranks when a process group is running (``sync``), and the running statistics are updated
    from them (unbiased variance, as ``nn.BatchNorm2d``). Masked sites of the output are exactly zero.
    """
    use_batch_stats = bn.training or bn.running_mean is None
    world = _process_group_size(sync)
    if mask is None and (not use_batch_stats or world == 1):  # dense and local: nn.BatchNorm2d itself
        return nn.BatchNorm2d.forward(bn, x)
    if not use_batch_stats:
        out = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return out * mask
    if mask is None:  # dense, statistics summed over ranks
        mask = x.new_ones(x.shape[0], 1, *x.shape[2:])
    if sites is None:
        sites = VisibleSites.of(mask.sum(dtype=torch.float64), mask.numel())
    tracking = bn if bn.training and bn.track_running_stats and bn.running_mean is not None else None
    return _MaskedBatchNormFunction.apply(x, mask, sites, bn.weight, bn.bias, bn.eps, world, tracking)


def _update_running_stats(
    bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, sites: VisibleSites
) -> None:
    """Exponential (or cumulative) running-stat update exactly as ``nn.BatchNorm2d`` does it."""
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    running = [bn.running_mean, bn.running_var]
    batch = [mean.to(bn.running_mean.dtype), (var * sites.unbiased).to(bn.running_var.dtype)]
    torch._foreach_lerp_(running, batch, momentum)


class _SparseLayer:
    """Mixin giving a rebuilt layer access to the encoder's :class:`SparsityContext`."""

    sparsity: SparsityContext


class SparseBatchNorm2d(nn.BatchNorm2d, _SparseLayer):
    """``nn.BatchNorm2d`` whose statistics cover visible sites only (dense when no mask is set)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask, sites = _site_mask(self.sparsity, x)
        return masked_batch_norm(self, x, mask, self.sparsity.sync_batchnorm, sites)


class SparseBatchNormAct2d(BatchNormAct2d, _SparseLayer):
    """timm ``BatchNormAct2d`` (norm, dropout, activation) with visible-site statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask, sites = _site_mask(self.sparsity, x)
        x = self.act(self.drop(masked_batch_norm(self, x, mask, self.sparsity.sync_batchnorm, sites)))
        return x if mask is None or isinstance(self.act, ZERO_PRESERVING) else x * mask


class SparseBatchNorm1d(nn.BatchNorm1d, _SparseLayer):
    """``nn.BatchNorm1d`` whose statistics over a token sequence ``(B', C, n)`` cover visible tokens only (the
    sequence's visibility from the running attention layer or from ``n``); vectors ``(B, C)`` and passes without a
    mask are the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparsity.enabled or x.dim() != 3:
            return super().forward(x)
        rows = self.sparsity.token_mask(x.shape[0], x.shape[-1])
        if rows is None:
            raise NoSparseVersion(
                f"BatchNorm1d over a sequence of shape {tuple(x.shape)} whose tokens are not identifiable as sites"
            )
        mask = rows.view(rows.shape[0], 1, rows.shape[1], 1).to(x.dtype)
        out = masked_batch_norm(self, x.unsqueeze(-1), mask, self.sparsity.sync_batchnorm)
        return out.squeeze(-1)


def _site_mask(sparsity: SparsityContext, x: torch.Tensor) -> tuple[torch.Tensor | None, VisibleSites | None]:
    """The mask at ``x``'s resolution and its visible sites, or (None, None) when dense."""
    if not sparsity.enabled:
        return None, None
    height, width = x.shape[-2:]
    return sparsity.mask(height, width, x.dtype), sparsity.visible_sites(height, width)


class _VisibleMaxPoolFunction(torch.autograd.Function):
    """2-D max-pooling over visible inputs with masked outputs zero. Keeps for backward the input
    itself (which the layer before it, a ReLU in ResNets, keeps anyway) and the argmax indices, not
    the filled copy of the input that ``max_pool2d``'s own backward would keep."""

    @staticmethod
    def forward(ctx, x, sparsity: SparsityContext, pool: nn.MaxPool2d):
        geometry = [_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation)]
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            fill_masked(sparsity, x, torch.finfo(x.dtype).min), *geometry, pool.ceil_mode
        )
        visible_out = sparsity.bool_mask(out.shape[-2], out.shape[-1])
        ctx.save_for_backward(x, indices, visible_out)
        ctx.geometry, ctx.ceil_mode = geometry, pool.ceil_mode
        return torch.where(visible_out, out, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        x, indices, visible_out = ctx.saved_tensors
        grad_out = torch.where(visible_out, grad_out, 0.0)  # masked outputs are constant zeros
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *ctx.geometry, ctx.ceil_mode, indices)
        return grad_x, None, None


class SparseMaxPool2d(nn.MaxPool2d, _SparseLayer):
    """``nn.MaxPool2d`` over visible inputs only, masked outputs zero (dense when no mask is set)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparsity.enabled:
            return super().forward(x)
        if self.return_indices:
            raise NotImplementedError("MaxPool2d(return_indices=True) has no sparse version")
        return _VisibleMaxPoolFunction.apply(x, self.sparsity, self)


# Activations with f(0) = 0: applied to a masked map they keep masked sites at zero.
ZERO_PRESERVING: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Tanh,
    timm_act.GELU, timm_act.Swish, timm_act.Mish, timm_act.HardSwish, timm_act.GELUTanh,
)

# Layers rebuilt as a sparse subclass (exact class match); timm's attention layers get their scoped subclass.
_REBUILT: Mapping[type, type] = MappingProxyType({
    nn.BatchNorm1d: SparseBatchNorm1d,
    nn.BatchNorm2d: SparseBatchNorm2d,
    BatchNormAct2d: SparseBatchNormAct2d,
    nn.MaxPool2d: SparseMaxPool2d,
    **SCOPED_LAYERS,
})

# How convolutions and linear layers on feature maps run: densely then masked, or at visible sites only.
BACKENDS: tuple[str, ...] = ("masked", "gather")

# Layers that mix sites in ways this suite does not make sparse, "module:Class" -> reason. Classes missing from
# the installed timm are skipped. Any BatchNorm class other than the exact types rebuilt above (e.g.
# SyncBatchNorm, BatchNorm3d) lands here too. Attention that folds sites into the batch without declaring how is
# also refused by the function mode whatever its class; this list catches what the function mode cannot see.
_UNSUPPORTED_SPECS: Mapping[str, str] = MappingProxyType({
    "torch.nn.modules.batchnorm:_BatchNorm": "this BatchNorm class has no sparse version",
    "timm.models.mobilevit:LinearSelfAttention": (
        "it attends over patches folded into a (patch, position) map that convolutions and its softmax would "
        "read as sites (MobileViT-V2 has no sparse version)"
    ),
})


def _resolve(specs: Mapping[str, str]) -> tuple[tuple[type, str], ...]:
    """The classes named by ``specs`` that exist in the installed packages, with their reasons."""
    resolved = ((named_class(spec), reason) for spec, reason in specs.items())
    return tuple((cls, reason) for cls, reason in resolved if cls is not None)


_UNSUPPORTED: tuple[tuple[type, str], ...] = _resolve(_UNSUPPORTED_SPECS)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot run sparsely (None if nothing is known against it)."""
    return next((reason for cls, reason in _UNSUPPORTED if isinstance(module, cls)), None)


def rebuild_as(module: nn.Module, cls: type) -> nn.Module:
    """A new instance of ``cls`` (a subclass of ``type(module)``) sharing ``module``'s parameters,
    buffers, children and settings, so state-dict keys and values are unchanged."""
    rebuilt = cls.__new__(cls)
    rebuilt.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(module).items()})
    return rebuilt


def sparsify(model: nn.Module, sparsity: SparsityContext, backend: str = "masked") -> None:
    """Make ``model``'s stateful layers compute submanifold-sparsely whenever ``sparsity`` holds a mask.

    Rebuilds BatchNorm and max-pool layers in place as sparse subclasses, attention layers as scoped subclasses
    (:mod:`pretrain.attention_layers`) and, with ``backend='gather'``, plain convolutions and linear layers
    (:mod:`pretrain.gather`); the rest of the sparse semantics comes from
    :class:`pretrain.sparse_functions.SparseFunctionMode` during the forward pass. Raises
    ``NotImplementedError`` naming the first layer that mixes sites and has no sparse version, and
    ``ValueError`` for an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r}; choose one of {', '.join(BACKENDS)}")

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            sparse_cls = _REBUILT.get(type(child)) or (gatherable(child) if backend == "gather" else None)
            if sparse_cls is not None:
                rebuilt = rebuild_as(child, sparse_cls)
                rebuilt.sparsity = sparsity
                setattr(parent, name, rebuilt)
                visit(rebuilt, f"{path}.")  # e.g. BatchNormAct2d's act/drop
                continue
            reason = unsupported_reason(child)
            if reason is not None:
                raise NotImplementedError(f"layer {path} ({type(child).__name__}) has no sparse version: {reason}")
            visit(child, f"{path}.")

    visit(model, "")
