"""The ``gather`` backend computes convolutions and linear layers at visible sites only and matches
the ``masked`` backend within 1e-4, in values and gradients, for every supported convnet family."""

import copy

import pytest
import timm
import torch
from encoder_properties import pixel_mask, random_mask
from test_encoder import MODELS
from torch import nn

from pretrain.encoder import SparseEncoder
from pretrain.gather import GatherConv2d, GatherLinear, gather_conv2d
from pretrain.mask_context import SparsityContext
from pretrain.spark import build_spark

SIZE, GRID, BATCH = 128, 4, 4  # BatchNorm over 4x4 stride-32 maps stays well conditioned
RTOL = 1e-4


def _backends(name: str) -> tuple[SparseEncoder, SparseEncoder]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0)
    return SparseEncoder(copy.deepcopy(model)), SparseEncoder(copy.deepcopy(model), backend="gather")


def _max_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest absolute difference over a list of tensors, relative to the largest expected magnitude
    (per-tensor scales are meaningless for gradients that vanish analytically, e.g. a bias before a BN)."""
    scale = max(float(e.detach().abs().max()) for e in expected)
    return max(float((a - e).detach().abs().max()) for a, e in zip(actual, expected, strict=True)) / scale


# every family in NCHW (SE: gather convolutions on pooled vectors); two in channels-last, where backward
# gathers again from the kept input map; HGNetV2, whose stem convolves a padded map
CASES = [(name, False) for name in MODELS] + [("resnet18", True), ("convnext_atto", True), ("hgnetv2_b0", False)]


@pytest.mark.parametrize(("name", "channels_last"), CASES)
def test_gather_matches_masked_values_and_gradients(name: str, channels_last: bool) -> None:
    masked, gather = _backends(name)
    assert any(isinstance(m, (GatherConv2d, GatherLinear)) for m in gather.modules())
    assert gather.model.state_dict().keys() == masked.model.state_dict().keys()
    active = random_mask(BATCH, GRID, keep=6, seed=1)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        masked.to(memory_format=torch.channels_last), gather.to(memory_format=torch.channels_last)
    results = []
    for encoder in (masked, gather):
        encoder.train()
        pixels = x.clone().requires_grad_(True)
        feats = encoder(pixels, active)
        probe = sum((f * torch.randn(f.shape, generator=torch.Generator().manual_seed(i))).sum()
                    for i, f in enumerate(feats))
        grads = torch.autograd.grad(probe, [pixels, *encoder.parameters()], allow_unused=True)
        results.append((feats, grads))
    (feats_m, grads_m), (feats_g, grads_g) = results
    for f_m, f_g in zip(feats_m, feats_g, strict=True):
        assert _max_error([f_g], [f_m]) <= RTOL
        hidden = ~pixel_mask(active, f_g.shape[-1])
        assert torch.count_nonzero(f_g * hidden) == 0, "gather backend wrote to a masked site"
    pairs = [(g, m) for g, m in zip(grads_g, grads_m, strict=True) if m is not None]
    assert all(g is not None for g, _ in pairs)
    assert _max_error(*zip(*pairs)) <= RTOL
    assert torch.count_nonzero(grads_g[0] * ~pixel_mask(active, SIZE)) == 0, "gradient leaked to masked pixels"


def test_gather_encoder_without_mask_is_the_dense_model() -> None:
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=0).eval()
    encoder = SparseEncoder(copy.deepcopy(reference), backend="gather").eval()
    x = torch.randn(2, 3, 64, 64)
    expected = reference.forward_intermediates(x, indices=4, intermediates_only=True)
    for actual, wanted in zip(encoder(x, None), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True),
        nn.Conv2d(6, 6, 5, padding=4, dilation=2, groups=6),  # dilated depthwise
        nn.Conv2d(6, 4, (1, 3), padding=(0, 1), groups=2),  # grouped, rectangular kernel
    ],
)
def test_gather_conv2d_equals_dense_conv_at_chosen_sites(conv: nn.Conv2d) -> None:
    x = torch.randn(2, 6, 16, 16).contiguous(memory_format=torch.channels_last)
    dense = conv(x)
    out_h, out_w = dense.shape[-2:]
    rows = torch.randperm(2 * out_h * out_w, generator=torch.Generator().manual_seed(0))[:20].sort().values
    sparse = gather_conv2d(conv, x, rows, (out_h, out_w))
    flat_dense = dense.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    flat_sparse = sparse.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(flat_sparse[rows], flat_dense[rows], rtol=1e-5, atol=1e-5)
    untouched = torch.ones(flat_sparse.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.count_nonzero(flat_sparse[untouched]) == 0


def test_visible_index_lists_visible_sites_in_order() -> None:
    sparsity = SparsityContext()
    active = random_mask(2, 2, keep=2, seed=3)
    with sparsity.use(active):
        index = sparsity.visible_index(4, 4)
        expected = pixel_mask(active, 4).flatten().nonzero().squeeze(1)
    torch.testing.assert_close(index, expected)


def test_spark_loss_is_backend_independent() -> None:
    losses = []
    for backend in ("masked", "gather"):
        torch.manual_seed(0)
        model = build_spark("convnext_atto", decoder_width=64, input_size=64, sparse_backend=backend)
        images = torch.randn(2, 3, 64, 64)
        active = model.mask(2, images.device, generator=torch.Generator().manual_seed(0))
        losses.append(model(images, active))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sparse backend 'dense'"):
        SparseEncoder(timm.create_model("resnet18", num_classes=0), backend="dense")
