"""Attention over visible tokens: values and gradients against dense attention on each sample's visible tokens
alone, keys pooled and normalised over visible tokens, windows without visible keys, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from encoder_properties import BRANCH_NOISE, make_pair, pixel_mask, random_mask
from equivalence import assert_per_tensor_close
from test_gather import FP64_RTOL
from timm.layers.attention2d import Attention2d, MultiQueryAttention2d, MultiQueryAttentionV2
from timm.layers.halo_attn import HaloAttn
from torch import nn

from pretrain.attention_layers import SCOPED_LAYERS
from pretrain.encoder import SparseEncoder
from pretrain.mask_context import SparsityContext, TokenScope, upsample_mask
from pretrain.site_maps import NoSparseVersion
from pretrain.sparse import SparseBatchNorm1d, rebuild_as
from pretrain.sparse_functions import SparseFunctionMode

ACTIVE = torch.tensor([[True, False], [False, True], [False, False], [False, True]]).view(2, 1, 2, 2)
HEADS, DIM = 2, 3


def _in_mode(fn, *args, active: torch.Tensor = ACTIVE, scope: TokenScope | None = None):
    sparsity = SparsityContext()
    with sparsity.use(active), SparseFunctionMode(sparsity):
        if scope is None:
            return fn(*args)
        with sparsity.attention(scope):
            return fn(*args)


def _qkv(tokens: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Per-head queries, keys and values ``(2, HEADS, tokens, DIM)`` of an 8x8 map's tokens (row-major)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, HEADS, tokens, DIM, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]


def _visible_rows(active: torch.Tensor = ACTIVE, size: int = 8) -> torch.Tensor:
    return upsample_mask(active, (size, size)).flatten(1)  # (B, size*size)


def _check_against_visible_tokens(attention, reference, scope: TokenScope | None = None) -> None:
    """``attention(q, k, v)`` in the mode (inside ``scope``) equals ``reference(q_b, k_b, v_b, rows)`` on each
    sample's visible tokens (values and gradients) and is zero at masked queries."""
    q, k, v = _qkv()
    out = _in_mode(attention, q, k, v, scope=scope)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad((out * probe).sum(), [q, k, v])
    rows = _visible_rows()
    assert torch.all(out[~rows[:, None, :, None].expand_as(out)] == 0)
    for b in range(2):
        picked = [t.detach()[b, :, rows[b]].clone().requires_grad_() for t in (q, k, v)]
        expected = reference(*picked, rows[b])
        torch.testing.assert_close(out[b, :, rows[b]], expected)
        crop_grads = torch.autograd.grad((expected * probe[b, :, rows[b]]).sum(), picked)
        for g, e in zip(grads, crop_grads, strict=True):
            torch.testing.assert_close(g[b, :, rows[b]], e)
            assert torch.all(g[b, :, ~rows[b]] == 0)


def test_scaled_dot_product_attention_over_a_maps_tokens_sees_visible_keys_only() -> None:
    _check_against_visible_tokens(F.scaled_dot_product_attention,
                                  lambda q, k, v, rows: F.scaled_dot_product_attention(q, k, v))


def test_a_boolean_attention_mask_is_kept_for_visible_keys() -> None:
    allowed = torch.rand(HEADS, 64, 64, generator=torch.Generator().manual_seed(6)) > 0.5
    allowed |= torch.eye(64, dtype=torch.bool)  # every query keeps one key of its own
    _check_against_visible_tokens(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
        lambda q, k, v, rows: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, rows][:, :, rows]),
    )


def test_an_additive_attention_mask_is_kept_for_visible_keys() -> None:
    bias = torch.randn(HEADS, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _check_against_visible_tokens(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        lambda q, k, v, rows: F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, rows][:, :, rows]),
    )


def test_explicit_softmax_inside_an_attention_layer_sees_visible_keys_only() -> None:
    """The ``q @ k^T`` form with the heads folded into the batch (BottleneckAttn's layout)."""

    def attention(q, k, v):
        logits = (q.flatten(0, 1) @ k.flatten(0, 1).transpose(-1, -2)) * DIM ** -0.5
        return (logits.softmax(dim=-1) @ v.flatten(0, 1)).view(q.shape)

    _check_against_visible_tokens(attention, lambda q, k, v, rows: F.scaled_dot_product_attention(q, k, v),
                                  scope=TokenScope(heads=HEADS))


def test_a_softmax_over_channels_is_not_taken_for_keys() -> None:
    logits = torch.randn(2, HEADS, 64, 64, dtype=torch.float64)  # e.g. 64 channels: as many as an 8x8 map's sites
    out = _in_mode(lambda t: t.softmax(-1), logits, scope=TokenScope(heads=HEADS, softmax_over_keys=False))
    torch.testing.assert_close(out, logits.softmax(-1))


def test_tokens_that_are_not_sites_of_a_map_are_refused() -> None:
    q, k, v = (t.detach().flatten(0, 1).reshape(2 * HEADS * 16, 4, DIM) for t in _qkv())  # windows in the batch
    with pytest.raises(NoSparseVersion, match="scaled_dot_product_attention over 4 keys in a batch of 64"):
        _in_mode(F.scaled_dot_product_attention, q, k, v)
    with pytest.raises(NoSparseVersion, match="causal"):
        _in_mode(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), *_qkv())


def test_halo_attention_keeps_padding_keys_drops_masked_ones_and_zeroes_empty_windows() -> None:
    torch.manual_seed(0)
    dense = HaloAttn(8, 8, num_heads=2, block_size=2, halo_size=1).double()
    layer = rebuild_as(copy.deepcopy(dense), SCOPED_LAYERS[HaloAttn])
    layer.sparsity = SparsityContext()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    full = torch.ones(2, 1, 2, 2, dtype=torch.bool)

    def run(active: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with layer.sparsity.use(active), SparseFunctionMode(layer.sparsity):
            return layer(inputs * upsample_mask(active, (8, 8)))

    torch.testing.assert_close(run(full, x), dense(x))  # every key the dense layer sees, zero padding included
    out = run(ACTIVE, x)
    visible = upsample_mask(ACTIVE, (8, 8))
    assert torch.all(out[~visible.expand_as(out)] == 0)
    # the keys at masked sites are not looked at: garbage written there after the projection changes nothing
    hook = layer.kv.register_forward_hook(lambda m, a, o: torch.where(visible, o, torch.randn_like(o) * 100))
    poisoned = run(ACTIVE, x)
    hook.remove()
    torch.testing.assert_close(poisoned, out)


def test_pooled_keys_average_and_normalise_visible_tokens() -> None:
    """NextViT's key path: a 1-D average pool in raster order, then BatchNorm1d over the pooled tokens."""
    # windows of two rows see two, one or no visible patches: a pooled token that is masked must stay out of the
    # BatchNorm statistics
    active = torch.tensor([[True, True], [False, False], [True, False], [False, True]]).view(2, 1, 2, 2)
    rows = _visible_rows(active)
    tokens = (torch.randn(2, 5, 64, dtype=torch.float64) * 3 + 1) * rows[:, None].double()
    tokens.requires_grad_()
    bn = rebuild_as(nn.BatchNorm1d(5).double(), SparseBatchNorm1d)
    nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    reference_bn = copy.deepcopy(bn)
    sparsity = SparsityContext()
    bn.sparsity = sparsity
    with sparsity.use(active), SparseFunctionMode(sparsity), sparsity.attention(TokenScope()):
        keys = nn.AvgPool1d(16)(tokens)  # 4 pooled tokens, each over 16 raster tokens (two rows of the map)
        out = bn(keys)
        assert torch.equal(sparsity.token_mask(2, 4), rows.view(2, 4, 16).any(-1))
    windows = rows.view(2, 4, 16)
    pooled = (tokens.view(2, 5, 4, 16).sum(-1) / windows.sum(-1).clamp_min(1)[:, None]) * windows.any(-1)[:, None]
    torch.testing.assert_close(keys, pooled)
    kept = windows.any(-1)
    expected = torch.zeros_like(out)
    expected.permute(0, 2, 1)[kept] = nn.BatchNorm1d.forward(reference_bn, pooled.permute(0, 2, 1)[kept])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bn.running_mean, reference_bn.running_mean)
    torch.testing.assert_close(bn.running_var, reference_bn.running_var)


@pytest.mark.parametrize(("name", "kwargs"), [("efficientformerv2_s0", {"img_size": 128}),
                                              pytest.param("mobilevit_xxs", {}, marks=pytest.mark.slow)])
def test_gather_backend_runs_hybrids_as_the_masked_one(name: str, kwargs: dict) -> None:
    """Talking heads convolve per-head logits (not maps) and folded tokens pass linear layers: the gather backend
    leaves both to the function mode and matches the masked backend in values and gradients."""
    # float64 (as the convnets' gather test): in fp32 the gradients of biases right before a norm, which vanish
    # analytically, are float noise of 1e-3 of their own scale in either backend
    model, masked = make_pair(name, dtype=torch.float64, perturb=BRANCH_NOISE, **kwargs)  # noised layer scales
    gather = SparseEncoder(copy.deepcopy(model), backend="gather")
    active = random_mask(2, 4, keep=6, seed=1)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for encoder in (masked, gather):
        feats = encoder(x, active)
        probe = sum((f * torch.randn(f.shape, generator=torch.Generator().manual_seed(i)).to(f)).sum()
                    for i, f in enumerate(feats))
        names = [n for n, _ in encoder.named_parameters()]
        grads = torch.autograd.grad(probe, [p for _, p in encoder.named_parameters()], allow_unused=True)
        results.append((dict(enumerate(feats)), dict(zip(names, grads, strict=True))))
    (feats_m, grads_m), (feats_g, grads_g) = results
    assert_per_tensor_close(feats_g, feats_m, FP64_RTOL, what="feature map")
    assert_per_tensor_close(grads_g, grads_m, FP64_RTOL, what="gradient")
    assert all(torch.count_nonzero(f * ~pixel_mask(active, f.shape[-1])) == 0 for f in feats_g.values())


def test_explicit_and_fused_attention_paths_agree() -> None:
    """timm's layers fall back to ``q @ k^T``, softmax, ``@ v`` without fused attention (``TIMM_FUSED_ATTN=0``): the
    scope makes that path attend over the same visible keys (multi-query attention, keys at half resolution)."""
    torch.manual_seed(0)
    layer = MultiQueryAttention2d(8, num_heads=2, key_dim=4, value_dim=4, kv_stride=2, dw_kernel_size=3).double()
    layer = rebuild_as(layer, SCOPED_LAYERS[MultiQueryAttention2d]).eval()
    layer.sparsity = SparsityContext()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64) * upsample_mask(ACTIVE, (8, 8))
    outputs = []
    for fused in (True, False):
        layer.fused_attn = fused
        with layer.sparsity.use(ACTIVE), SparseFunctionMode(layer.sparsity):
            outputs.append(layer(x))
    torch.testing.assert_close(outputs[1], outputs[0])
    assert torch.all(outputs[0][~upsample_mask(ACTIVE, (8, 8)).expand_as(outputs[0])] == 0)


@pytest.mark.parametrize("cls", [MultiQueryAttentionV2, Attention2d], ids=["MultiQueryAttentionV2", "Attention2d"])
def test_attention_on_a_map_equals_the_dense_layer_on_each_visible_rectangle(cls) -> None:
    """Global attention has no positions: on each sample's visible rectangle it is the dense layer on that
    rectangle alone (MultiQueryAttentionV2's einsum logits run over queries, heads, keys)."""
    torch.manual_seed(0)
    dense = cls(8, num_heads=2).double().eval()
    for p in dense.parameters():
        nn.init.normal_(p, std=0.5)
    layer = rebuild_as(copy.deepcopy(dense), SCOPED_LAYERS[cls])
    layer.sparsity = SparsityContext()
    active = torch.tensor([[True, True], [False, False], [False, True], [False, True]]).view(2, 1, 2, 2)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64) * upsample_mask(active, (8, 8))
    with layer.sparsity.use(active), SparseFunctionMode(layer.sparsity):
        out = layer(x)
    for b, (rows, cols) in enumerate(((slice(0, 4), slice(0, 8)), (slice(0, 8), slice(4, 8)))):
        torch.testing.assert_close(out[b:b + 1, :, rows, cols], dense(x[b:b + 1, :, rows, cols]))
    assert torch.all(out[~upsample_mask(active, (8, 8)).expand_as(out)] == 0)
