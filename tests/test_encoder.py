"""The four properties of the sparse encoder, for every convnet family the suite supports."""

import copy

import pytest
import timm
import torch

from pretrain.encoder import SparseEncoder

MODELS = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "seresnet50",
    "convnext_atto",  # conv-MLP ConvNeXt (LayerNorm2d, 1x1 convs)
    "convnext_small",  # linear-MLP ConvNeXt (channels-last LayerNorm, Linear)
    "regnety_016",
    "efficientnet_b0",
]
SIZE = 96  # 3x3 patch grid
BATCH = 2


def _pair(name: str) -> tuple[torch.nn.Module, SparseEncoder]:
    torch.manual_seed(0)
    reference = timm.create_model(name, num_classes=0)
    return reference, SparseEncoder(copy.deepcopy(reference))


def _random_mask(batch: int, grid: int, keep: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, grid * grid, generator=g).argsort(1)[:, :keep]
    active = torch.zeros(batch, grid * grid, dtype=torch.bool).scatter_(1, idx, True)
    return active.view(batch, 1, grid, grid)


def _pixel_mask(active: torch.Tensor, size: int) -> torch.Tensor:
    scale = size // active.shape[-1]
    return active.repeat_interleave(scale, 2).repeat_interleave(scale, 3)


def _assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_full_mask_equals_dense_timm(name: str, train: bool) -> None:
    reference, encoder = _pair(name)
    reference.train(train)
    encoder.train(train)
    # batch 4 at 128 px keeps BatchNorm over the 4x4 stride-32 maps well conditioned: at batch 2 on
    # 3x3 maps timm's own fp32 output is already ~1e-5 away from its fp64 result (EfficientNet-B0)
    x = torch.randn(4, 3, 128, 128)
    active = torch.ones(4, 1, 4, 4, dtype=torch.bool)
    expected = reference.forward_intermediates(x, indices=4, intermediates_only=True)
    actual = encoder(x, active)
    assert [f.shape[1] for f in actual] == encoder.channels
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        _assert_close_relative(a, e)
    if train:  # running statistics updated identically
        for (key, a), e in zip(encoder.model.state_dict().items(), reference.state_dict().values(), strict=True):
            if key.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_masked_sites_are_exactly_zero_and_nothing_leaks(name: str) -> None:
    _, encoder = _pair(name)
    encoder.train()
    grid = SIZE // 32
    active = _random_mask(BATCH, grid, keep=4, seed=1)
    pixel_mask = _pixel_mask(active, SIZE)

    x = torch.randn(BATCH, 3, SIZE, SIZE, requires_grad=True)
    feats = encoder(x, active)
    for f in feats:
        site_mask = _pixel_mask(active, f.shape[-1])
        assert torch.all(f.masked_select(~site_mask.expand_as(f)) == 0)
        assert f.masked_select(site_mask.expand_as(f)).abs().sum() > 0

    # gradient w.r.t. masked input pixels is exactly zero
    sum(f.square().sum() for f in feats).backward()
    assert torch.all(x.grad.masked_select(~pixel_mask.expand_as(x)) == 0)
    assert x.grad.masked_select(pixel_mask.expand_as(x)).abs().sum() > 0

    # changing masked pixels changes nothing (fresh copy: running stats must not differ either)
    _, other = _pair(name)
    other.train()
    x2 = torch.where(pixel_mask, x.detach(), torch.randn_like(x) * 10)
    for a, b in zip(encoder(x.detach(), active), other(x2, active), strict=True):
        assert torch.equal(a, b)


BN_MODELS = [m for m in MODELS if not m.startswith("convnext")]


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_statistics_come_from_visible_sites(name: str) -> None:
    _, encoder = _pair(name)
    encoder.train()
    active = _random_mask(BATCH, SIZE // 32, keep=4, seed=2)
    inputs: dict[str, torch.Tensor] = {}
    norms = {n: m for n, m in encoder.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert norms
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach()))
               for n, m in norms.items()]
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    encoder(torch.randn(BATCH, 3, SIZE, SIZE), active)
    for h in handles:
        h.remove()
    for n, bn in norms.items():
        if n not in inputs:  # not on the path to the four maps (e.g. EfficientNet head)
            continue
        x = inputs[n]
        visible = _pixel_mask(active, x.shape[-1]).expand(-1, x.shape[1], -1, -1)
        sites = x.permute(1, 0, 2, 3)[visible.permute(1, 0, 2, 3)].view(x.shape[1], -1)
        mean, var = sites.mean(1), sites.var(1, unbiased=True)
        old_mean, old_var = before[n]
        m = bn.momentum
        torch.testing.assert_close(bn.running_mean, (1 - m) * old_mean + m * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, (1 - m) * old_var + m * var, rtol=1e-5, atol=1e-6)


def test_state_dict_keys_are_timms() -> None:
    reference, encoder = _pair("efficientnet_b0")
    assert list(encoder.model.state_dict()) == list(timm.create_model("efficientnet_b0", num_classes=0).state_dict())
    assert encoder.downsample_ratio == 32
    fresh = timm.create_model("efficientnet_b0", num_classes=0)
    fresh.load_state_dict(encoder.model.state_dict(), strict=True)


def test_classifier_model_is_stripped_to_timm_num_classes_0() -> None:
    encoder = SparseEncoder(timm.create_model("resnet18"))
    assert list(encoder.model.state_dict()) == list(timm.create_model("resnet18", num_classes=0).state_dict())


def test_two_encoders_do_not_share_masks() -> None:
    _, a = _pair("resnet18")
    _, b = _pair("resnet18")
    x = torch.randn(1, 3, 64, 64)
    full = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    half = torch.tensor([[[[True, False], [False, True]]]])
    a.eval(), b.eval()
    ref = a(x, full)
    b(x, half)
    for r, again in zip(ref, a(x, full), strict=True):
        assert torch.equal(r, again)


def test_no_mask_is_a_plain_dense_pass() -> None:
    reference, encoder = _pair("resnet18")
    reference.eval(), encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    for a, e in zip(encoder(x, None), reference.forward_intermediates(x, indices=4, intermediates_only=True),
                    strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize(
    ("shape", "mask_shape", "message"),
    [
        ((1, 3, 100, 96), (1, 1, 3, 3), "not divisible by 32"),
        ((1, 3, 96, 96), (1, 1, 2, 3), "does not match"),
        ((2, 3, 96, 96), (1, 1, 3, 3), "does not match"),
    ],
)
def test_bad_shapes_raise_value_error(shape, mask_shape, message) -> None:
    _, encoder = _pair("resnet18")
    with pytest.raises(ValueError, match=message):
        encoder(torch.randn(*shape), torch.ones(*mask_shape, dtype=torch.bool))


def test_float_mask_is_rejected() -> None:
    _, encoder = _pair("resnet18")
    with pytest.raises(ValueError, match="bool"):
        encoder(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 2, 2))


def test_model_without_stride_32_maps_is_rejected() -> None:
    with pytest.raises(ValueError):
        SparseEncoder(torch.nn.Conv2d(3, 8, 3))


def test_deep_copy_masks_with_its_own_context() -> None:
    _, encoder = _pair("seresnet50")
    encoder.eval()
    twin = copy.deepcopy(encoder)
    x = torch.randn(2, 3, 64, 64)
    active = torch.tensor([[[[True, False], [False, True]]], [[[False, True], [True, True]]]])
    for a, b in zip(encoder(x, active), twin(x, active), strict=True):
        assert torch.equal(a, b)
    dense = twin(x, None)
    with encoder.sparsity.use(active):  # the original's mask must not reach the copy
        leaked = twin(x, None)
    for a, b in zip(dense, leaked, strict=True):
        assert torch.equal(a, b)


def test_layers_without_a_sparse_version_are_refused() -> None:
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model("resnet18", num_classes=0))
    with pytest.raises(NotImplementedError, match="SyncBatchNorm"):
        SparseEncoder(model)
