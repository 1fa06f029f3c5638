"""Group, instance and multi-dimensional layer norms and spreads over H and W, over visible sites only: values and
gradients against the dense op on each sample's visible region (a rectangle, so the dense op can run on it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GroupNorm1, GroupNormAct
from torch import nn

from pretrain.mask_context import SparsityContext, upsample_mask
from pretrain.site_maps import NoSparseVersion
from pretrain.sparse_functions import SparseFunctionMode

# sample 0 sees the top row of a 2x2 patch grid, sample 1 the right column: rectangles of an 8x8 map
ACTIVE = torch.tensor([[True, True], [False, False], [False, True], [False, True]]).view(2, 1, 2, 2)
REGIONS = ((slice(0, 4), slice(0, 8)), (slice(0, 8), slice(4, 8)))


def _map(channels: int = 4, seed: int = 0) -> torch.Tensor:
    """A (2, channels, 8, 8) float64 map with a mean and spread per channel, zero at masked sites."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 8, 8, generator=g, dtype=torch.float64) * 2 + torch.randn(channels, 1, 1, generator=g)
    return (x * upsample_mask(ACTIVE, (8, 8))).requires_grad_()


def _in_mode(fn, *args):
    sparsity = SparsityContext()
    with sparsity.use(ACTIVE), SparseFunctionMode(sparsity):
        return fn(*args)


def _crops(x: torch.Tensor) -> list[torch.Tensor]:
    """Each sample's visible rectangle as a (1, C, h, w) leaf that records its gradient."""
    return [x.detach()[b:b + 1, :, rows, cols].clone().requires_grad_() for b, (rows, cols) in enumerate(REGIONS)]


def _assert_matches_crops(sparse_fn, dense_fn, x: torch.Tensor, params: tuple[torch.Tensor, ...] = ()) -> None:
    """``sparse_fn(x)`` in the function mode equals ``dense_fn(crop, b)`` on each visible rectangle and is zero
    elsewhere; gradients of a random probe, to the visible inputs and to ``params``, are the dense ones."""
    out = _in_mode(sparse_fn, x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * probe).sum(), [x, *params])
    visible = upsample_mask(ACTIVE, (8, 8)).expand_as(out)
    assert torch.all(out[~visible] == 0)
    crops = _crops(x)
    expected_params = [torch.zeros_like(p) for p in params]
    for b, ((rows, cols), crop) in enumerate(zip(REGIONS, crops, strict=True)):
        expected = dense_fn(crop, b)
        torch.testing.assert_close(out[b:b + 1, :, rows, cols], expected)
        crop_grads = torch.autograd.grad((expected * probe[b:b + 1, :, rows, cols]).sum(), [crop, *params])
        torch.testing.assert_close(grads[0][b:b + 1, :, rows, cols], crop_grads[0])
        for total, g in zip(expected_params, crop_grads[1:], strict=True):
            total += g
    for actual, expected in zip(grads[1:], expected_params, strict=True):
        torch.testing.assert_close(actual, expected)


def _affine(shape: tuple[int, ...], seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=g, dtype=torch.float64) + 1).requires_grad_()
    return weight, torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm_normalises_each_sample_and_group_over_visible_sites(groups: int) -> None:
    x = _map()
    weight, bias = _affine((4,))
    _assert_matches_crops(lambda t: F.group_norm(t, groups, weight, bias, 1e-5),
                          lambda crop, b: F.group_norm(crop, groups, weight, bias, 1e-5), x, (weight, bias))


def test_timm_group_norm_layers_run_sparsely() -> None:
    x = _map()
    for layer in (GroupNorm1(4).double(), GroupNormAct(4, 2, act_layer=nn.GELU).double()):
        nn.init.normal_(layer.weight), nn.init.normal_(layer.bias)
        _assert_matches_crops(layer, lambda crop, b, layer=layer: layer(crop), x, (layer.weight, layer.bias))


def test_instance_norm_uses_visible_sites_and_tracks_their_statistics() -> None:
    x = _map()
    weight, bias = _affine((4,))
    start_mean, start_var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    running = (start_mean.clone(), start_var.clone())
    per_sample = [(start_mean.clone(), start_var.clone()) for _ in REGIONS]
    _assert_matches_crops(
        lambda t: F.instance_norm(t, *running, weight, bias, True, 0.1, 1e-5),
        lambda crop, b: F.instance_norm(crop, *per_sample[b], weight, bias, True, 0.1, 1e-5),
        x, (weight, bias),
    )
    # each sample's own update, averaged: the batch update torch makes from per-instance statistics
    torch.testing.assert_close(running[0], (per_sample[0][0] + per_sample[1][0]) / 2)
    torch.testing.assert_close(running[1], (per_sample[0][1] + per_sample[1][1]) / 2)


def test_instance_norm_with_running_statistics_is_one_affine_map_per_site() -> None:
    x = _map()
    running = (torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5)
    out = _in_mode(lambda t: F.instance_norm(t, *running, None, None, False), x)
    torch.testing.assert_close(out, F.instance_norm(x, *running, None, None, False) * upsample_mask(ACTIVE, (8, 8)))


@pytest.mark.parametrize("dims", ["CHW", "HW"])
def test_layer_norm_over_the_map_of_nchw_input_covers_visible_sites(dims: str) -> None:
    x = _map()
    shape = (4, 8, 8) if dims == "CHW" else (8, 8)
    weight, bias = _affine(shape)

    def crop_norm(crop: torch.Tensor, b: int) -> torch.Tensor:
        rows, cols = REGIONS[b]
        return F.layer_norm(crop, crop.shape[-len(shape):], weight[..., rows, cols], bias[..., rows, cols])

    _assert_matches_crops(lambda t: F.layer_norm(t, shape, weight, bias), crop_norm, x, (weight, bias))


def test_layer_norm_over_a_channels_last_map_covers_visible_sites() -> None:
    x = _map()
    weight, bias = _affine((8, 8, 4))

    def crop_norm(crop: torch.Tensor, b: int) -> torch.Tensor:
        rows, cols = REGIONS[b]
        nhwc = crop.permute(0, 2, 3, 1)
        return F.layer_norm(nhwc, nhwc.shape[1:], weight[rows, cols], bias[rows, cols]).permute(0, 3, 1, 2)

    _assert_matches_crops(
        lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (8, 8, 4), weight, bias).permute(0, 3, 1, 2), crop_norm, x,
        (weight, bias),
    )


@pytest.mark.parametrize(
    "spread",
    [
        lambda t: t.var((2, 3), keepdim=True),
        lambda t: torch.std(t, dim=(1, 2, 3), keepdim=True),
        lambda t: t.var(dim=(2, 3), correction=0, keepdim=True),
        lambda t: torch.var_mean(t, (2, 3), keepdim=True)[0] + torch.var_mean(t, (2, 3), keepdim=True)[1],
        lambda t: torch.std_mean(t, (2, 3), unbiased=False, keepdim=True)[0],
    ],
    ids=["var", "std-CHW", "var-correction0", "var_mean", "std_mean"],
)
def test_spatial_spreads_cover_visible_sites(spread) -> None:
    x = _map()
    out = _in_mode(spread, x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (grad,) = torch.autograd.grad((out * probe).sum(), [x])
    for b, (crop, (rows, cols)) in enumerate(zip(_crops(x), REGIONS, strict=True)):
        expected = spread(crop)
        torch.testing.assert_close(out[b:b + 1], expected)
        (crop_grad,) = torch.autograd.grad((expected * probe[b:b + 1]).sum(), [crop])
        torch.testing.assert_close(grad[b:b + 1, :, rows, cols], crop_grad)


def test_spread_without_keepdim_and_over_channels_only_is_unchanged() -> None:
    x = _map()
    torch.testing.assert_close(_in_mode(lambda t: t.var((2, 3)), x)[0], _crops(x)[0].var((2, 3))[0])
    torch.testing.assert_close(_in_mode(lambda t: t.std(1), x), x.std(1))  # a spread over channels per site


def test_local_response_norm_is_per_site() -> None:
    x = _map()
    out = _in_mode(nn.LocalResponseNorm(3), x)
    torch.testing.assert_close(out, nn.LocalResponseNorm(3)(x))
    assert torch.all(out[~upsample_mask(ACTIVE, (8, 8)).expand_as(out)] == 0)


def test_norms_over_sites_that_cannot_be_told_apart_are_refused() -> None:
    x = _map()
    with pytest.raises(NoSparseVersion, match="mixes sites"):
        _in_mode(lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (8, 4)), x)  # (W, C): the sites of one row
    with pytest.raises(NoSparseVersion, match="group_norm on a tensor of shape"):
        _in_mode(lambda t: F.group_norm(t.flatten(2), 2), x)  # sites flattened: not a map any more
