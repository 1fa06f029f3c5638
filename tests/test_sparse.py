"""The sparse operators: the BatchNorm kernel against the straightforward gather/BatchNorm1d/scatter formulation,
the max pool, and the function mode (global pools, pads, attention pooling inside a forward)."""

import pytest
import torch
import torch.nn.functional as F
from encoder_properties import BRANCH_NOISE, make_pair
from equivalence import assert_per_tensor_close, named_gradients
from timm.layers import GlobalContext
from torch import nn

from pretrain.sparse import (
    SparseBatchNorm2d,
    SparseMaxPool2d,
    SparsityContext,
    VisibleSites,
    _MaskedBatchNormFunction,
    masked_batch_norm,
    rebuild_as,
    upsample_mask,
)
from pretrain.sparse_functions import SparseFunctionMode


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
    """On noised weights (every branch active), each parameter's gradient within 1e-4 of its own scale."""
    reference, encoder = make_pair("resnet18", perturb=BRANCH_NOISE)
    x = torch.randn(4, 3, 64, 64)
    for feat in reference.forward_intermediates(x, indices=4, intermediates_only=True):
        feat.square().mean().backward(retain_graph=True)
    for feat in encoder(x, torch.ones(4, 1, 2, 2, dtype=torch.bool)):
        feat.square().mean().backward(retain_graph=True)
    assert_per_tensor_close(named_gradients(encoder.model), named_gradients(reference), 1e-4, what="gradient")


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


# --- the function mode: global pools, pads and attention pooling inside a block's forward ---------------------


def _visible_map(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (2, 3, 8, 8) map, zero outside a 2x2 patch mask with one and three visible patches."""
    active = torch.tensor([[True, False], [False, False], [True, True], [False, True]]).view(2, 1, 2, 2)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * upsample_mask(active, (8, 8)), active


def _in_mode(active: torch.Tensor, fn, *args):
    sparsity = SparsityContext()
    with sparsity.use(active), SparseFunctionMode(sparsity):
        return fn(*args)


def _visible_mean(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return x.sum((2, 3), keepdim=True) / upsample_mask(active, x.shape[-2:]).sum((2, 3), keepdim=True)


@pytest.mark.parametrize(
    ("pool", "reference"),
    [
        (lambda x: x.mean((2, 3), keepdim=True), _visible_mean),
        (lambda x: torch.mean(x, dim=(-1, -2)), lambda x, a: _visible_mean(x, a)[..., 0, 0]),
        (lambda x: x.sum(1, keepdim=True).mean((2, 3)), lambda x, a: _visible_mean(x, a).sum(1)[..., 0]),  # SK unit
        (lambda x: F.adaptive_avg_pool2d(x, 1), _visible_mean),
        (lambda x: nn.AdaptiveAvgPool2d((1, 1))(x), _visible_mean),
        (lambda x: F.avg_pool2d(x, x.shape[-2:]), _visible_mean),
        (lambda x: x.flatten(2).mean(-1), lambda x, a: _visible_mean(x, a)[..., 0, 0]),
    ],
    ids=["tensor.mean", "torch.mean", "sum-then-mean", "adaptive", "module", "avg_pool2d", "flatten-mean"],
)
def test_global_averages_in_a_forward_count_visible_sites_only(pool, reference) -> None:
    x, active = _visible_map()
    torch.testing.assert_close(_in_mode(active, pool, x), reference(x, active))


@pytest.mark.parametrize(
    "pool", [lambda x: x.amax((2, 3), keepdim=True), lambda x: F.adaptive_max_pool2d(x, 1)], ids=["amax", "adaptive"]
)
def test_global_maxima_ignore_masked_sites(pool) -> None:
    x, active = _visible_map()
    x = x - 10 * upsample_mask(active, (8, 8))  # visible values all negative: a masked zero must not win
    expected = torch.where(upsample_mask(active, (8, 8)), x, -torch.inf).amax((2, 3), keepdim=True)
    torch.testing.assert_close(_in_mode(active, pool, x), expected)


def test_functional_max_pool_with_indices_ignores_masked_sites() -> None:
    """``F.max_pool2d(..., return_indices=True)`` dispatches to another function than without indices: it must be
    sparse too (found by the refusal tests: a masked zero used to win over negative visible values)."""
    x, active = _visible_map()
    x = x - 10 * upsample_mask(active, (8, 8))
    values, indices = _in_mode(active, lambda t: F.max_pool2d(t, 4, return_indices=True), x)
    expected, expected_indices = F.max_pool2d(torch.where(upsample_mask(active, (8, 8)), x, -torch.inf), 4,
                                              return_indices=True)
    visible = upsample_mask(active, (2, 2))
    torch.testing.assert_close(values, torch.where(visible, expected, 0.0))
    assert torch.equal(indices[visible.expand_as(indices)], expected_indices[visible.expand_as(indices)])


def test_pooled_vectors_pass_convolutions_and_batchnorm_unmasked() -> None:
    """A squeeze-excitation-like path: 1x1 outputs are pooled vectors, not maps the 2x2 grid must mask."""
    x, active = _visible_map()
    fc = nn.Conv2d(3, 4, 1).double()
    bn = rebuild_as(nn.BatchNorm2d(4).double(), SparseBatchNorm2d)
    sparsity = SparsityContext()
    bn.sparsity = sparsity
    with sparsity.use(active), SparseFunctionMode(sparsity):
        out = bn(fc(x.mean((2, 3), keepdim=True)))
    visible = upsample_mask(active, (8, 8))
    expected = nn.BatchNorm2d(4).double()(fc(x.sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True)))
    torch.testing.assert_close(out, expected)


def test_average_pool_counts_padding_as_the_dense_pool_and_masked_sites_not_at_all() -> None:
    x, active = _visible_map()
    pool = nn.AvgPool2d(3, stride=1, padding=1)  # count_include_pad=True, as in Res2Net
    full = torch.ones_like(active)
    torch.testing.assert_close(_in_mode(full, pool, x), pool(x), rtol=0, atol=1e-15)
    visible = upsample_mask(active, (8, 8)).double()
    padding = 9 - F.avg_pool2d(torch.ones_like(visible), 3, 1, 1, count_include_pad=True) * 9
    divisor = F.avg_pool2d(visible, 3, 1, 1, divisor_override=1) + padding
    expected = F.avg_pool2d(x, 3, 1, 1, divisor_override=1) / divisor.clamp_min(1) * visible
    torch.testing.assert_close(_in_mode(active, pool, x), expected)


def test_padded_maps_keep_their_sites_positions() -> None:
    """HGNetV2's stem: pad right and bottom by one, then a 2x2 max pool at stride 1 back to the map's size."""
    x, active = _visible_map()
    x = x - 10 * upsample_mask(active, (8, 8))

    def stem(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(t, (0, 1, 0, 1)), 2, stride=1)

    visible = upsample_mask(active, (8, 8))
    filled = F.pad(torch.where(visible, x, -torch.inf), (0, 1, 0, 1))  # padding holds its value, 0
    expected = torch.where(visible, F.max_pool2d(filled, 2, stride=1), 0.0)
    torch.testing.assert_close(_in_mode(active, stem, x), expected)
    torch.testing.assert_close(_in_mode(torch.ones_like(active), stem, x), stem(x))


def test_padding_to_a_size_the_network_uses_is_ambiguous() -> None:
    x, active = _visible_map()
    with pytest.raises(ValueError, match="ambiguous"):
        _in_mode(active, lambda t: F.max_pool2d(F.pad(t, (4, 4, 4, 4)), 1), x)  # 8x8 -> 16x16


def test_attention_pooling_weighs_visible_positions_and_keeps_masked_sites_zero() -> None:
    torch.manual_seed(0)
    block = GlobalContext(3, fuse_add=True, fuse_scale=False).double()
    for p in block.parameters():
        nn.init.normal_(p, std=0.5)
    x, active = _visible_map()
    out = _in_mode(active, block, x)
    visible = upsample_mask(active, (8, 8))
    logits = block.conv_attn(x).masked_fill(~visible, -torch.inf).flatten(2).softmax(-1)
    context = (x.flatten(2) * logits).sum(-1)[..., None, None]
    expected = (x + block.mlp_add(context)) * visible
    torch.testing.assert_close(out, expected)


def test_self_attention_over_tokens_folded_into_the_batch_is_refused() -> None:
    """Over a map's own tokens attention works (tests/test_sparse_attention.py); tokens folded into the batch by
    a layer that does not say how (windows) cannot be told apart as sites."""
    x, active = _visible_map()
    tokens = x.flatten(2).transpose(1, 2).reshape(2 * 16, 4, 3)
    with pytest.raises(NotImplementedError, match="scaled_dot_product_attention"):
        _in_mode(active, F.scaled_dot_product_attention, tokens, tokens, tokens)


def test_mask_views_at_coarser_and_finer_resolutions() -> None:
    sparsity = SparsityContext()
    active = torch.tensor([[True, False], [False, False]]).view(1, 1, 2, 2)
    with sparsity.use(active):
        assert sparsity.bool_mask(1, 1).item() is True  # a pooled vector of a sample with a visible patch
        assert torch.equal(sparsity.bool_mask(4, 4), upsample_mask(active, (4, 4)))
        with pytest.raises(ValueError, match="does not line up"):
            sparsity.bool_mask(3, 3)


def test_adaptive_average_pool_to_a_coarser_grid_averages_visible_sites() -> None:
    x, active = _visible_map()
    visible = upsample_mask(active, (8, 8)).double()
    sums, counts = F.avg_pool2d(x, 2, divisor_override=1), F.avg_pool2d(visible, 2, divisor_override=1)
    expected = sums / counts.clamp_min(1) * upsample_mask(active, (4, 4))
    torch.testing.assert_close(_in_mode(active, lambda t: F.adaptive_avg_pool2d(t, 4), x), expected)


def test_bilinear_upsampling_weighs_visible_sources_like_the_dense_op_on_the_visible_region() -> None:
    """At the border of a visible rectangle, bilinear upsampling from visible sources only is the dense upsampling
    of the rectangle alone (which clamps at its edge); masked sources, even holding garbage, weigh nothing."""
    active = torch.tensor([[True, True], [False, False], [False, True], [False, True]]).view(2, 1, 2, 2)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    garbage = torch.where(upsample_mask(active, (4, 4)), x, 1e3)
    out = _in_mode(active, lambda t: F.interpolate(t, scale_factor=2, mode="bilinear"), garbage)
    for b, (rows, cols) in enumerate(((slice(0, 2), slice(0, 4)), (slice(0, 4), slice(2, 4)))):
        expected = F.interpolate(x[b:b + 1, :, rows, cols], scale_factor=2, mode="bilinear")
        fine = (slice(2 * rows.start, 2 * rows.stop), slice(2 * cols.start, 2 * cols.stop))
        torch.testing.assert_close(out[b:b + 1, :, fine[0], fine[1]], expected)
    assert torch.all(out[~upsample_mask(active, (8, 8)).expand_as(out)] == 0)
    full = torch.ones_like(active)
    torch.testing.assert_close(_in_mode(full, lambda t: F.interpolate(t, size=(8, 8), mode="bilinear"), x),
                               F.interpolate(x, size=(8, 8), mode="bilinear"))
