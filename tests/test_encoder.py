"""The four properties of the sparse encoder in fp32 on the suite's reference models, on weights with noise on
biases, norm affines and layer scales (fresh timm weights switch residual branches off: zero-initialised last
BatchNorms, 1e-6 layer scales); a mask context of its own per encoder; and the refusals that come when an encoder
is built."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from encoder_properties import (
    BRANCH_NOISE,
    check_full_mask_equals_dense,
    check_visible_batchnorm_statistics,
    check_zeros_and_no_leakage,
    make_pair,
)
from torch import nn

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


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_full_mask_equals_dense_timm(name: str, train: bool) -> None:
    # batch 4 at 128 px keeps BatchNorm over the 4x4 stride-32 maps well conditioned: at batch 2 on
    # 3x3 maps timm's own fp32 output is already ~1e-5 away from its fp64 result (EfficientNet-B0)
    check_full_mask_equals_dense(*make_pair(name, perturb=BRANCH_NOISE), train, size=128, batch=4)


@pytest.mark.parametrize("name", MODELS)
def test_masked_sites_are_exactly_zero_and_nothing_leaks(name: str) -> None:
    _, encoder = make_pair(name, perturb=BRANCH_NOISE)
    check_zeros_and_no_leakage(encoder, size=SIZE, batch=BATCH, keep=4)


BN_MODELS = [m for m in MODELS if not m.startswith("convnext")]


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_statistics_come_from_visible_sites(name: str) -> None:
    _, encoder = make_pair(name, perturb=BRANCH_NOISE)
    check_visible_batchnorm_statistics(encoder, size=SIZE, batch=BATCH, keep=4)


def test_state_dict_keys_are_timms() -> None:
    reference, encoder = make_pair("efficientnet_b0")
    assert list(encoder.model.state_dict()) == list(timm.create_model("efficientnet_b0", num_classes=0).state_dict())
    assert encoder.downsample_ratio == 32
    fresh = timm.create_model("efficientnet_b0", num_classes=0)
    fresh.load_state_dict(encoder.model.state_dict(), strict=True)


def test_classifier_model_is_stripped_to_timm_num_classes_0() -> None:
    encoder = SparseEncoder(timm.create_model("resnet18"))
    assert list(encoder.model.state_dict()) == list(timm.create_model("resnet18", num_classes=0).state_dict())


def check_encoders_keep_their_own_masks(a: SparseEncoder, b: SparseEncoder) -> None:
    """``b`` runs with the opposite mask in the middle of ``a``'s forward (a hook after ``a``'s first stage):
    ``a``'s maps stay exactly those of its own mask. Encoders sharing one mask context would see ``b``'s mask, or
    none at all, in ``a``'s later stages."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask_a = torch.tensor([[True, False], [False, True]]).expand(2, 1, 2, 2).clone()
    a.eval(), b.eval()
    expected = a(x, mask_a)

    def run_b(*_) -> None:
        b(x, ~mask_a)

    handle = a.model.layer1.register_forward_hook(run_b)
    try:
        actual = a(x, mask_a)
    except Exception as error:  # a context left without a mask, or with b's, may also break the pass
        raise AssertionError(f"a's pass failed once b ran inside it: {error}") from error
    finally:
        handle.remove()
    for e, f in zip(expected, actual, strict=True):
        assert torch.equal(e, f), "b's mask changed a's maps"


def test_two_encoders_do_not_share_masks() -> None:
    check_encoders_keep_their_own_masks(make_pair("resnet18", perturb=BRANCH_NOISE)[1],
                                        make_pair("resnet18", perturb=BRANCH_NOISE)[1])


def test_no_mask_is_a_plain_dense_pass() -> None:
    reference, encoder = make_pair("resnet18")
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
    _, encoder = make_pair("resnet18")
    with pytest.raises(ValueError, match=message):
        encoder(torch.randn(*shape), torch.ones(*mask_shape, dtype=torch.bool))


def test_float_mask_is_rejected() -> None:
    _, encoder = make_pair("resnet18")
    with pytest.raises(ValueError, match="bool"):
        encoder(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize(("model", "message"), [
    (lambda: nn.Conv2d(3, 8, 3), "Conv2d is not a timm model with forward_intermediates()"),
    # a dilated ResNet (segmentation's output_stride 16) really has maps at strides 2, 4, 8, 16, 16
    (lambda: timm.create_model("resnet18", num_classes=0, output_stride=16),
     r"ResNet has no feature maps at strides \[32\]; SparK needs four stages at strides 4/8/16/32"),
])
def test_models_without_maps_at_strides_4_to_32_are_rejected(model, message) -> None:
    with pytest.raises(ValueError, match=message):
        SparseEncoder(model())


def test_deep_copy_masks_with_its_own_context() -> None:
    _, encoder = make_pair("seresnet50")
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


@pytest.mark.parametrize(("convert", "layer", "reason"), [
    (nn.SyncBatchNorm.convert_sync_batchnorm, "SyncBatchNorm", "this BatchNorm class has no sparse version"),
    (lambda m: _replace(m, "layer1.1.bn2", _OwnBatchNorm(64)), "_OwnBatchNorm", "this BatchNorm class has no sparse"),
])
def test_layers_without_a_sparse_version_are_refused(convert, layer, reason) -> None:
    model = convert(timm.create_model("resnet18", num_classes=0))
    with pytest.raises(NotImplementedError, match=f"layer .*\\({layer}\\) has no sparse version: .*{reason}") as info:
        SparseEncoder(model)
    assert "\n" not in str(info.value)


class _OwnBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass (runs densely on a map like its parent) that the sparse encoder cannot know."""


def test_local_response_norm_mixes_channels_not_sites() -> None:
    """LocalResponseNorm normalises each site over neighbouring channels: it runs as it is, dense at a full mask,
    zero at masked sites, no leakage."""
    reference = _replace(timm.create_model("resnet18", num_classes=0).double(), "layer1.1.act2",
                         nn.LocalResponseNorm(3))
    encoder = SparseEncoder(copy.deepcopy(reference))
    check_full_mask_equals_dense(reference, encoder, train=True, size=64, batch=2, rtol=1e-8)
    check_zeros_and_no_leakage(encoder, size=64, batch=2, keep=2)


def _replace(model: nn.Module, path: str, layer: nn.Module) -> nn.Module:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, layer)
    return model


class _TokenAttention(torch.nn.Module):
    """Self-attention within windows of four tokens of a map, folded into the batch, written with
    scaled_dot_product_attention (a class the sparse encoder has never heard of, which says nothing of how it
    folds the sites: over a map's own tokens it would just work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2).reshape(-1, 4, x.shape[1])
        out = torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        return out.reshape(x.shape[0], -1, x.shape[1]).transpose(1, 2).reshape(x.shape)


class _PositionalMap(torch.nn.Module):
    """Adds a map-sized constant, which writes to masked sites and has no sparse version."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones_like(x[:1])


class _GridPool(nn.Module):
    """Adds back an adaptive pool of the map to ``size`` (upsampled): a pyramid-pooling-like context."""

    def __init__(self, size: int, indices: bool = False) -> None:
        super().__init__()
        self.size, self.indices = size, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.indices:
            pooled = F.adaptive_max_pool2d(x, self.size, return_indices=True)[0]
        else:
            pooled = F.adaptive_avg_pool2d(x, self.size)
        return x + F.interpolate(pooled, size=x.shape[-2:])


class _PatchUnfoldConv(nn.Module):
    """Folds the 2x2 blocks of sites into the batch dimension, convolves, folds back (MobileViT's unfolding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        folded = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b * 4, c, h // 2, w // 2)
        out = self.conv(folded).reshape(b, 2, 2, c, h // 2, w // 2)
        return out.permute(0, 3, 4, 1, 5, 2).reshape(b, c, h, w)


@pytest.mark.parametrize(
    ("layer", "error", "message"),
    [
        (_TokenAttention(), NotImplementedError, "resnet18 cannot run sparsely: scaled_dot_product_attention over 4"),
        (_PositionalMap(), ValueError, "resnet18 cannot run sparsely: its stride-4 map is not zero at masked"),
        # the probe's stride-4 map is 16x16: a 3x3 grid of pools does not divide it
        (_GridPool(3), NotImplementedError,
         "resnet18 cannot run sparsely: adaptive average pooling from 16x16 to 3x3 has no sparse version"),
        (_GridPool(2, indices=True), NotImplementedError,
         "resnet18 cannot run sparsely: adaptive max pooling with indices has no sparse version"),
        (_PatchUnfoldConv(), ValueError, r"resnet18 cannot run sparsely: a convolution on a tensor of shape "
                                         r"\(8, 64, 8, 8\) .*sites folded into the batch dimension cannot be masked"),
    ],
    ids=["attention", "positional-map", "adaptive-non-dividing", "adaptive-indices", "patch-unfolding"],
)
def test_models_that_cannot_run_sparsely_are_refused_when_built(layer, error, message) -> None:
    model = timm.create_model("resnet18", num_classes=0)
    model.layer1[1].act2 = layer  # the last activation of the first stage
    with pytest.raises(error, match=message) as info:
        SparseEncoder(model)
    assert "\n" not in str(info.value)


def test_probe_at_construction_changes_no_state() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0)
    model.layer2.eval()  # e.g. a frozen stage: its mode must survive the probe
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    encoder = SparseEncoder(model)
    assert [m.training for m in encoder.model.modules()] == modes
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_meta_device_build_checks_shapes_dry() -> None:
    """The runner's config check builds the model on the meta device: the probe runs dry there."""
    with torch.device("meta"):
        encoder = SparseEncoder.from_name("hgnetv2_b0")
        assert encoder.channels == SparseEncoder.from_name("hgnetv2_b0", backend="gather").channels
    model = timm.create_model("resnet18", num_classes=0)
    model.layer1[1].act2 = _TokenAttention()
    with pytest.raises(NotImplementedError, match="scaled_dot_product_attention"):
        SparseEncoder(model.to("meta"))
