"""Submanifold-sparse execution of an unmodified timm convnet.

The sparse semantics are realised on dense tensors whose masked sites are exactly zero:
every layer that could write a non-zero value to a masked site (convolutions, linear layers on
feature maps, per-site norms, pooling) is followed by a multiplication with the patch mask at its
output resolution, and every layer that mixes sites (BatchNorm statistics, max-pooling,
squeeze-excitation means) only reads visible sites. Pointwise activations keep zeros at zero.

No timm class is edited. Stateless layers get forward hooks; BatchNorm and squeeze-excitation
layers are rebuilt as subclasses that share the original parameters and buffers, so the model's
``state_dict`` keys are untouched. The mask lives in a :class:`SparsityContext` owned by one
encoder instance and is set only for the duration of that encoder's forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerNorm2d, SEModule
from timm.layers import activations as timm_act
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn
from torch.nn.modules.utils import _pair

from .gather import gatherable

__all__ = [
    "BACKENDS",
    "SparsityContext",
    "SparseBatchNorm2d",
    "SparseBatchNormAct2d",
    "SparseMaxPool2d",
    "VisibleSites",
    "masked_batch_norm",
    "rebuild_as",
    "sparsify",
    "upsample_mask",
]


class SparsityContext:
    """The patch mask of the current forward pass and its views at every feature resolution.

    ``active`` is a bool tensor ``(B, 1, h, w)`` on the patch grid (True = visible). Views at a
    resolution ``(H, W)`` that is an integer multiple of the grid are the nearest upsampling of it
    and are computed once per forward pass and dtype.
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

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, evaluated once per forward pass for each ``key`` (the mask views below, and
        index tensors that layers such as :mod:`pretrain.gather` derive from the mask)."""
        if key not in self._views:
            self._views[key] = compute()
        return self._views[key]

    def bool_mask(self, height: int, width: int) -> torch.Tensor:
        """The bool mask ``(B, 1, H, W)`` at ``(height, width)``."""
        return self.cached(("bool", height, width), lambda: self._upsample(height, width))

    def _upsample(self, height: int, width: int) -> torch.Tensor:
        grid_h, grid_w = self.active.shape[-2:]
        if height % grid_h or width % grid_w or height // grid_h != width // grid_w:
            raise ValueError(
                f"feature map of size {height}x{width} is not an integer upsampling of the "
                f"{grid_h}x{grid_w} patch grid; the encoder must not downsample beyond its "
                "patch size"
            )
        return upsample_mask(self.active, (height, width))

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


def upsample_mask(active: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest upsampling of a patch mask ``(B, 1, h, w)`` to ``size`` (integer multiples of h and w)."""
    scale_h, scale_w = size[0] // active.shape[-2], size[1] // active.shape[-1]
    return active.repeat_interleave(scale_h, dim=-2).repeat_interleave(scale_w, dim=-1)


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


def _site_mask(sparsity: SparsityContext, x: torch.Tensor) -> tuple[torch.Tensor | None, VisibleSites | None]:
    """The mask at ``x``'s resolution and its visible sites, or (None, None) when dense."""
    if not sparsity.enabled:
        return None, None
    height, width = x.shape[-2:]
    return sparsity.mask(height, width, x.dtype), sparsity.visible_sites(height, width)


def _visible_mean(sparsity: SparsityContext, x: torch.Tensor) -> torch.Tensor:
    """Spatial mean of ``x`` (B, C, H, W) over visible sites, shape (B, C, 1, 1)."""
    if not sparsity.enabled:
        return x.mean((2, 3), keepdim=True)
    counts = sparsity.visible_per_sample(x.shape[-2], x.shape[-1]).to(x.dtype)
    return x.sum((2, 3), keepdim=True) / counts.view(-1, 1, 1, 1)


class SparseSEModule(SEModule, _SparseLayer):
    """timm ``SEModule`` whose squeeze averages visible sites only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_maxpool:
            raise NotImplementedError("SEModule(add_maxpool=True) has no sparse version")
        x_se = self.fc2(self.act(self.bn(self.fc1(_visible_mean(self.sparsity, x)))))
        return x * self.gate(x_se)


class SparseSqueezeExcite(SqueezeExcite, _SparseLayer):
    """timm EfficientNet ``SqueezeExcite`` whose squeeze averages visible sites only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_expand(self.act1(self.conv_reduce(_visible_mean(self.sparsity, x))))
        return x * self.gate(x_se)


def _fill_masked_for_max(sparsity: SparsityContext, x: torch.Tensor) -> torch.Tensor:
    """``x`` with its masked sites set to the lowest finite value, so they never win a max over a
    visible one.

    Not -inf: in a window of masked sites only, a finite value still wins over the implicit -inf
    padding, so the recorded argmax is an in-bounds (masked) site and the backward pass never
    indexes outside the input (whose output is zeroed anyway, so it gets no gradient).
    """
    visible = sparsity.bool_mask(x.shape[-2], x.shape[-1])
    # torch.where keeps a channels-last input channels-last (masked_fill with an NCHW mask does not)
    return torch.where(visible, x, torch.finfo(x.dtype).min)


class _VisibleMaxPoolFunction(torch.autograd.Function):
    """2-D max-pooling over visible inputs with masked outputs zero. Keeps for backward the input
    itself (which the layer before it, a ReLU in ResNets, keeps anyway) and the argmax indices, not
    the filled copy of the input that ``max_pool2d``'s own backward would keep."""

    @staticmethod
    def forward(ctx, x, sparsity: SparsityContext, pool: nn.MaxPool2d):
        geometry = [_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation)]
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            _fill_masked_for_max(sparsity, x), *geometry, pool.ceil_mode
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

# Layers rebuilt as a sparse subclass (exact class match; their insides are left dense).
_REBUILT: Mapping[type, type] = MappingProxyType({
    nn.BatchNorm2d: SparseBatchNorm2d,
    BatchNormAct2d: SparseBatchNormAct2d,
    SEModule: SparseSEModule,
    SqueezeExcite: SparseSqueezeExcite,
    nn.MaxPool2d: SparseMaxPool2d,
})

# How convolutions and linear layers on feature maps run: densely then masked, or at visible sites only.
BACKENDS: tuple[str, ...] = ("masked", "gather")

# Layers that mix sites in ways this module does not make sparse.
# (Any other BatchNorm class, e.g. SyncBatchNorm, lands here too: only the exact types above are rebuilt.)
_UNSUPPORTED: tuple[type, ...] = (
    nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
)


def rebuild_as(module: nn.Module, cls: type) -> nn.Module:
    """A new instance of ``cls`` (a subclass of ``type(module)``) sharing ``module``'s parameters,
    buffers, children and settings, so state-dict keys and values are unchanged."""
    rebuilt = cls.__new__(cls)
    rebuilt.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(module).items()})
    return rebuilt


# Forward hooks of the stateless layers. They find the mask through the layer's ``sparsity``
# attribute (set by :func:`sparsify`), so a deep copy of an encoder masks with its own context.


def _mask_output(module: nn.Module, out: torch.Tensor, channels_last: bool) -> torch.Tensor | None:
    """Zero the masked sites of a 4D output (NCHW, or NHWC if ``channels_last``) in place."""
    sparsity: SparsityContext = module.sparsity
    if not sparsity.enabled or out.dim() != 4:
        return None
    h, w = (out.shape[1], out.shape[2]) if channels_last else (out.shape[-2], out.shape[-1])
    # in place: none of the hooked layers keeps its output for backward
    return out.mul_(sparsity.mask(h, w, out.dtype, channels_last))


def _mask_nchw_output_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    return _mask_output(module, out, channels_last=False)


def _mask_nhwc_output_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    return _mask_output(module, out, channels_last=True)


def _max_pool_pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    """Masked inputs of a max-pool subclass (e.g. timm's ``MaxPool2dSame``) lose every max."""
    if not module.sparsity.enabled:
        return None
    return (_fill_masked_for_max(module.sparsity, args[0]),)


def _max_pool_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    if not module.sparsity.enabled:
        return None
    visible = module.sparsity.bool_mask(out.shape[-2], out.shape[-1])
    return out.masked_fill_(~visible, 0.0)


def _avg_pool_hook(module: nn.AvgPool2d, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """Turn an average pool into an average over visible inputs only."""
    sparsity: SparsityContext = module.sparsity
    if not sparsity.enabled:
        return None
    (x,) = args
    visible_in = sparsity.mask(x.shape[-2], x.shape[-1], out.dtype)
    fraction = F.avg_pool2d(
        visible_in, module.kernel_size, module.stride, module.padding,
        module.ceil_mode, module.count_include_pad, module.divisor_override,
    )
    visible_out = sparsity.mask(out.shape[-2], out.shape[-1], out.dtype)
    return out / fraction.clamp_min(1e-6) * visible_out


def _install_hooks(module: nn.Module, sparsity: SparsityContext) -> list:
    """Hook one stateless layer; returns the hook handles (empty if the layer needs none)."""
    if isinstance(module, nn.AvgPool2d):
        hooks = [module.register_forward_hook(_avg_pool_hook)]
    elif isinstance(module, nn.MaxPool2d):  # subclasses only: nn.MaxPool2d itself is rebuilt
        hooks = [module.register_forward_pre_hook(_max_pool_pre_hook), module.register_forward_hook(_max_pool_hook)]
    elif isinstance(module, (nn.Conv2d, LayerNorm2d)):
        hooks = [module.register_forward_hook(_mask_nchw_output_hook)]
    elif isinstance(module, (nn.Linear, nn.LayerNorm)):
        # applied to feature maps only in channels-last blocks (ConvNeXt's linear MLP)
        hooks = [module.register_forward_hook(_mask_nhwc_output_hook)]
    else:
        return []
    module.sparsity = sparsity
    return hooks


def sparsify(model: nn.Module, sparsity: SparsityContext, backend: str = "masked") -> list:
    """Make ``model`` compute submanifold-sparsely whenever ``sparsity`` holds a mask.

    Rebuilds BatchNorm and squeeze-excitation layers in place as sparse subclasses and hooks
    convolutions, linear layers, norms and max-pools. With ``backend='gather'``, plain convolutions
    and linear layers on feature maps are rebuilt to compute at visible sites only
    (:mod:`pretrain.gather`). Returns the hook handles. Raises ``NotImplementedError`` for layers that
    mix sites and have no sparse version, ``ValueError`` for an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    handles: list = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            sparse_cls = _REBUILT.get(type(child)) or (gatherable(child) if backend == "gather" else None)
            if sparse_cls is not None:
                rebuilt = rebuild_as(child, sparse_cls)
                rebuilt.sparsity = sparsity
                setattr(parent, name, rebuilt)
                if issubclass(sparse_cls, nn.modules.batchnorm._BatchNorm):
                    visit(getattr(parent, name), f"{path}.")  # e.g. BatchNormAct2d's act/drop
                continue  # squeeze-excitation internals act on pooled vectors: left dense; gather layers are leaves
            if isinstance(child, _UNSUPPORTED):
                raise NotImplementedError(f"layer {path} ({type(child).__name__}) has no sparse version")
            handles.extend(_install_hooks(child, sparsity))
            visit(child, f"{path}.")

    visit(model, "")
    return handles
