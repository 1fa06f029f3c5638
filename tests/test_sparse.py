"""The sparse BatchNorm kernel against the straightforward gather/BatchNorm1d/scatter formulation."""

import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.encoder import SparseEncoder
from pretrain.sparse import (
    SparseMaxPool2d,
    SparsityContext,
    VisibleSites,
    _MaskedBatchNormFunction,
    masked_batch_norm,
    rebuild_as,
    upsample_mask,
)


def _masked_input(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 1, 4, 4, generator=g) < 0.5).to(dtype)
    x = (torch.randn(3, 5, 4, 4, generator=g, dtype=dtype) * 2 + 1) * mask
    return x.requires_grad_(), mask


def _gathered_batch_norm(bn1d: nn.BatchNorm1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The published formulation: permute, boolean gather of visible sites, BatchNorm1d, scatter."""
    visible = mask[:, 0].bool()
    nhwc = x.permute(0, 2, 3, 1)
    out = torch.zeros_like(nhwc)
    out[visible] = bn1d(nhwc[visible])
    return out.permute(0, 3, 1, 2)


def test_forward_backward_and_running_stats_match_gathered_formulation() -> None:
    x, mask = _masked_input()
    bn_a = nn.BatchNorm2d(5).double()
    nn.init.normal_(bn_a.weight), nn.init.normal_(bn_a.bias)
    bn_b = nn.BatchNorm1d(5).double()
    bn_b.load_state_dict(bn_a.state_dict())
    out_a = masked_batch_norm(bn_a, x, mask)
    x_b = x.detach().clone().requires_grad_()
    out_b = _gathered_batch_norm(bn_b, x_b, mask)
    torch.testing.assert_close(out_a, out_b)
    weights = torch.randn_like(out_a)
    (out_a * weights).sum().backward()
    (out_b * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_b.grad)
    torch.testing.assert_close(bn_a.weight.grad, bn_b.weight.grad)
    torch.testing.assert_close(bn_a.bias.grad, bn_b.bias.grad)
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var)
    assert torch.all(x.grad[mask.expand_as(x) == 0] == 0)


def test_gradcheck() -> None:
    x, mask = _masked_input()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(x_: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sites = VisibleSites.of(mask.sum(dtype=torch.float32), mask.numel())
        return _MaskedBatchNormFunction.apply(x_ * mask, mask, sites, w, b, 1e-5, 1, None)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_full_mask_gradients_equal_dense_timm() -> None:
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=0)
    encoder = SparseEncoder(copy.deepcopy(reference))
    x = torch.randn(4, 3, 64, 64)
    for feat in reference.forward_intermediates(x, indices=4, intermediates_only=True):
        feat.square().mean().backward(retain_graph=True)
    for feat in encoder(x, torch.ones(4, 1, 2, 2, dtype=torch.bool)):
        feat.square().mean().backward(retain_graph=True)
    for (name, a), b in zip(encoder.model.named_parameters(), reference.parameters(), strict=True):
        scale = b.grad.abs().max()
        assert (a.grad - b.grad).abs().max() <= 1e-4 * scale, name


def test_bf16_statistics_are_computed_in_float32() -> None:
    """Visible-site statistics of a bf16 map whose mean dwarfs its spread (a cancellation that bf16
    statistics cannot survive) match the float64 computation on the same bf16 values."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 1, 8, 8, generator=g) < 0.4).double()
    x = ((torch.randn(4, 16, 8, 8, generator=g, dtype=torch.float64) * 0.1 + 3) * mask).bfloat16()
    bn = nn.BatchNorm2d(16)
    reference = _gathered_batch_norm(nn.BatchNorm1d(16).double(), x.double(), mask)
    out = masked_batch_norm(bn, x, mask.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference, rtol=0.0, atol=0.05)


def test_max_pool_over_visible_sites_keeps_no_copy_of_its_input() -> None:
    sparsity = SparsityContext()
    pool = rebuild_as(nn.MaxPool2d(3, stride=2, padding=1), SparseMaxPool2d)
    pool.sparsity = sparsity
    g = torch.Generator().manual_seed(0)
    active = torch.tensor([[True, False], [False, False], [True, True], [False, True]]).view(2, 1, 2, 2)
    visible_in, visible_out = upsample_mask(active, (8, 8)), upsample_mask(active, (4, 4))
    x = (torch.randn(2, 4, 8, 8, generator=g) * visible_in).requires_grad_()  # visible values of both signs
    saved = []
    with sparsity.use(active), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = pool(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = F.max_pool2d(torch.where(visible_in, x_ref, -torch.inf), 3, stride=2, padding=1)
    ref = torch.where(visible_out, ref, 0.0)
    assert torch.equal(out, ref)
    probe = torch.randn(out.shape, generator=g)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    # what backward keeps: the input itself (shared with the layer before), indices and masks
    kept = [t for t in saved if t.is_floating_point()]
    assert kept and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)
