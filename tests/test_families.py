"""Any timm convnet, really: the sparse encoder's properties over many timm families, and the families it
refuses when it is built.

Every model runs in float64 (so tolerances can be tight without BatchNorm conditioning worries) with noise
added to its biases, norm affines and layer scales (see ``make_pair``), on 64 px inputs (2x2 patches) and,
for the visible-averaging property, 128 px (4x4 patches). The first model of each family is in the default
set, so ``make test`` exercises every family; the other variants are ``slow``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from encoder_properties import (
    _padding_as_absent,
    check_central_crop,
    check_full_mask_equals_dense,
    check_masked_keys_ignored,
    check_visible_averaging,
    check_visible_batchnorm_statistics,
    check_zeros_and_no_leakage,
    make_pair,
    map_sites,
    pixel_mask,
    token_sites,
)
from timm.layers.attention2d import MultiQueryAttention2d
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.models.edgenext import PositionalEncodingFourier
from timm.models.efficientformer_v2 import Attention2d as EfficientFormerV2Attention
from timm.models.efficientformer_v2 import Attention2dDownsample
from timm.models.fastvit import Attention as FastVitAttention
from timm.models.mobilevit import MobileVitBlock
from timm.models.nextvit import EfficientAttention
from torch import nn

from pretrain.encoder import SparseEncoder

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-6
SIZE, BATCH, KEEP = 64, 2, 2  # 2x2 patch grid, two visible patches per sample

# family -> timm models; the first one runs by default, the rest are slow. What each family exercises beyond
# convolutions and BatchNorm is in its name.
FAMILIES: dict[str, tuple[str, ...]] = {
    "ResNet (incl. -D, -T)": ("resnet18", "resnet10t", "resnet18d", "resnet26t"),
    "ResNetV2 (pre-activation)": ("resnetv2_18", "resnetv2_18d"),
    "SE/ECA ResNets (global means in blocks)": ("seresnet18", "ecaresnet26t", "seresnext26d_32x4d"),
    "SENet legacy (nn.AdaptiveAvgPool2d in SE)": ("legacy_seresnet18",),
    "SKNet (selective kernel)": ("skresnet18", "skresnext50_32x4d"),
    "ResNeSt (split attention)": ("resnest14d",),
    "Res2Net (AvgPool2d counting padding)": ("res2next50", "res2net50_14w_8s"),
    "anti-aliased ResNets (BlurPool2d, functional conv2d)": ("resnetblur18", "resnetaa34d"),
    "RegNetX/Y": ("regnetx_002", "regnety_002"),
    "ByobNet: RegNetZ, GENet, SE/ECA-ts": ("regnetz_b16", "gernet_s", "seresnext26ts", "eca_resnext26ts"),
    "GCNet (global-context attention pooling)": ("gcresnext26ts", "gc_efficientnetv2_rw_t"),
    "RepVGG / MobileOne": ("repvgg_a0", "mobileone_s0"),
    "EfficientNet (incl. TF 'same' padding)": (
        "tf_efficientnet_b0", "efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "tinynet_e",
    ),
    "MobileNetV2": ("mobilenetv2_050",),
    "MobileNetV3 / LCNet (hard-sigmoid SE)": ("mobilenetv3_small_050", "lcnet_050", "mobilenetv3_large_075"),
    "MobileNetV4 (conv)": ("mobilenetv4_conv_small_035",),
    "NAS mobile nets: MixNet, MnasNet, FBNet, SPNASNet, HardCoReNAS": (
        "mixnet_s", "mnasnet_small", "semnasnet_050", "fbnetc_100", "fbnetv3_b", "spnasnet_100", "hardcorenas_a",
    ),
    "GhostNet": ("ghostnet_050", "ghostnetv3_050"),
    "GhostNetV2 (DFC attention at half resolution)": ("ghostnetv2_100",),
    "RepGhost": ("repghostnet_050",),
    "ReXNet": ("rexnet_100", "rexnetr_100"),
    "CSPNet / DarkNet": ("cs3darknet_focus_s", "cs3darknet_s", "darknet17", "cspresnet50", "cs3sedarknet_l"),
    "DLA": ("dla46_c", "dla46x_c"),
    "VoVNet (effective SE)": ("ese_vovnet19b_dw", "ese_vovnet19b_slim_dw", "vovnet39a"),
    "HGNetV2 (asymmetric stem padding)": ("hgnetv2_b0",),
    "HGNet (ESE)": ("hgnet_tiny",),
    "ConvNeXt (LayerNorm, linear MLP)": ("convnext_atto", "convnext_zepto_rms"),
    "ConvNeXt-V2 (global response norm)": ("convnextv2_atto",),
    "InceptionNeXt": ("inception_next_atto",),
    "MambaOut (gated convolutions)": ("mambaout_femto",),
    "FastViT (RepMixer stages)": ("fastvit_t8",),
    "EfficientViT-MIT (ReLU linear attention)": ("efficientvit_b0",),
    "DenseNet": ("densenet121",),
    "DPN": ("dpn48b",),
    "NFNet (norm-free, scaled std conv)": ("nf_regnet_b0", "nf_resnet26"),
    "TResNet (space-to-depth stem)": ("tresnet_m",),
    "HRNet (upsampling fusion)": ("hrnet_w18_small",),
    "RepViT": ("repvit_m0_9",),
    "StarNet": ("starnet_s050",),
}

# family -> (a model, what its one-line refusal names: a layer class or a function)
REFUSED: dict[str, tuple[str, str]] = {
    "MobileViTV2 (linear attention over patches folded into a map)": ("mobilevitv2_050", "LinearSelfAttention"),
    "TinyViT (window attention, windows folded into the batch)": ("tiny_vit_5m_224", "scaled_dot_product_attention"),
}


def _cases() -> list:
    cases = []
    for models in FAMILIES.values():
        cases.append(pytest.param(models[0], id=models[0]))
        cases += [pytest.param(m, id=m, marks=pytest.mark.slow) for m in models[1:]]
    return cases


def test_the_family_table_has_the_models_and_families_the_readme_claims() -> None:
    models = [m for family in FAMILIES.values() for m in family]
    claim = re.search(r"Tested on (\d+) timm convnets in (\d+) families and (\d+) hybrid\s+cases in (\d+) families",
                      (REPO / "README.md").read_text())
    assert claim, "the README no longer states how many models and families are tested"
    hybrids = [case for family in HYBRIDS.values() for case in family]
    assert (len(models), len(FAMILIES), len(hybrids), len(HYBRIDS)) == tuple(int(n) for n in claim.groups())
    assert len(set(models)) == len(models)


@pytest.mark.parametrize("name", _cases())
def test_encoder_properties(name: str) -> None:
    reference, encoder = make_pair(name, dtype=torch.float64, perturb=0.2)
    check_full_mask_equals_dense(reference, encoder, train=True, size=SIZE, batch=BATCH, rtol=RTOL)
    check_full_mask_equals_dense(reference, encoder, train=False, size=SIZE, batch=BATCH, rtol=RTOL)
    check_zeros_and_no_leakage(encoder, size=SIZE, batch=BATCH, keep=KEEP)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()):
        check_visible_batchnorm_statistics(encoder, size=SIZE, batch=BATCH, keep=KEEP, rtol=RTOL)
    check_visible_averaging(reference, encoder, train=True, rtol=RTOL)


@pytest.mark.parametrize(("name", "layer"), list(REFUSED.values()), ids=[v[0] for v in REFUSED.values()])
def test_refused_at_construction_with_a_one_line_reason(name: str, layer: str) -> None:
    with pytest.raises(NotImplementedError) as info:
        SparseEncoder.from_name(name)
    message = str(info.value)
    assert layer in message and "\n" not in message


# --- hybrids: attention over visible tokens, GroupNorm over visible sites -------------------------------------


def _same_model(reference: nn.Module) -> nn.Module:
    return _padding_as_absent(copy.deepcopy(reference))


@dataclass(frozen=True)
class Hybrid:
    """How one hybrid model is checked: ``size`` px inputs for dense equivalence, zeros and leakage and for the
    masked-key check; ``timm_kwargs`` for ``timm.create_model``; ``crop`` builds the central-crop reference from
    the reference model (at ``crop_grid`` patches per side), or says why a crop has no sparse twin."""

    name: str
    size: int = SIZE
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    crop: Callable[[nn.Module], nn.Module] | str = _same_model
    crop_grid: int = 4


def _full_image_positions(reference: nn.Module) -> nn.Module:
    """The crop reference of EdgeNeXt: its Fourier position encoding, which scales positions by the map's size,
    gives each site of the crop the encoding of its place in the full image (sparse semantics keeps real
    positions)."""

    def centre_of_full_image(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        batch, height, width = args[0]
        full = module.forward((batch, 2 * height, 2 * width))
        return full[..., height // 2:height // 2 + height, width // 2:width // 2 + width]

    crop = _same_model(reference)
    for module in crop.modules():
        if isinstance(module, PositionalEncodingFourier):
            module.register_forward_hook(centre_of_full_image)
    return crop


def _tables_cut_to(crop_size: int) -> Callable[[nn.Module], nn.Module]:
    """A crop reference built for ``crop_size`` px (models whose position tables are sized for their input) with
    the reference's weights and its relative position tables cut to the offsets the crop has: the central rows of
    BoTNet's ``(2S-1, d)`` tables, the ``|dy|, |dx| < s`` entries of EfficientFormerV2's ``|dy|*S + |dx|`` biases."""

    def build(reference: nn.Module) -> nn.Module:
        name = reference.pretrained_cfg["architecture"]
        crop = timm.create_model(name, num_classes=0, img_size=crop_size).to(next(reference.parameters()).dtype)
        target, state = crop.state_dict(), {}
        for key, value in reference.state_dict().items():
            shape = target[key].shape
            if key.endswith("_rel"):
                start = (value.shape[0] - shape[0]) // 2
                value = value[start:start + shape[0]]
            elif key.endswith("attention_biases"):
                full, cut = round(value.shape[1] ** 0.5), round(shape[1] ** 0.5)
                value = value.view(-1, full, full)[:, :cut, :cut].reshape(shape)
            state[key] = value
        crop.load_state_dict(state)
        return _padding_as_absent(crop)

    return build


def _max_pool_padding_as_absent(reference: nn.Module) -> nn.Module:
    """The crop reference of BiT, whose stem pads with zeros before its max pool: padding that never wins, as
    masked neighbours never do."""
    crop = _same_model(reference)
    for module in crop.modules():
        if isinstance(module, nn.ConstantPad2d):
            module.value = -torch.inf
    return crop


def _folded_sites(patch: tuple[int, int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Visible rows of MobileViT's tokens ``(B*P, N, C)``: patches of ``patch`` sites folded into the batch."""

    def sites(out: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        (patch_h, patch_w), batch = patch, active.shape[0]
        side = round((out.shape[0] // batch * out.shape[1]) ** 0.5)
        visible = pixel_mask(active, side).view(batch, side // patch_h, patch_h, side // patch_w, patch_w)
        return visible.permute(0, 2, 4, 1, 3).reshape(out.shape[0], -1, 1)

    return sites


def _pooled_sites(ratio: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Visible rows of NextViT's keys ``(B, N/ratio, C)``, pooled from ``ratio`` raster tokens: any visible."""

    def sites(out: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        tokens = token_sites(out.new_empty(out.shape[0], out.shape[1] * ratio, 1), active)
        return tokens.view(out.shape[0], out.shape[1], ratio).any(-1, keepdim=True)

    return sites


# attention class -> the projections feeding its queries, keys and values, with their layout; projections that
# also feed anything else (EfficientFormerV2's values feed a convolution) are left out
_PROJECTIONS: dict[type, Callable[[nn.Module], list[tuple[nn.Module, Callable]]]] = {
    MultiQueryAttention2d: lambda m: [(m.query, map_sites), (m.key, map_sites), (m.value, map_sites)],
    FastVitAttention: lambda m: [(m.qkv, token_sites)],
    EfficientFormerV2Attention: lambda m: [(m.q, map_sites), (m.k, map_sites)],
    Attention2dDownsample: lambda m: [(m.q, map_sites), (m.k, map_sites)],
    EfficientAttention: lambda m: [(m.q, token_sites), *((p, _pooled_sites(m.N_ratio)) for p in (m.k, m.v))],
    MobileVitBlock: lambda m: [(block.attn.qkv, _folded_sites(m.patch_size)) for block in m.transformer],
    HaloAttn: lambda m: [(m.q, map_sites), (m.kv, map_sites)],
    BottleneckAttn: lambda m: [(m.qkv, map_sites)],
}


def _attention_projections(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    return [pair for m in model.modules() for cls, found in _PROJECTIONS.items() if isinstance(m, cls)
            for pair in found(m)]


_HALO_PADDING = "the dense crop attends to zero padding at its border, the sparse model leaves masked keys out"
_NO_DROP = {"drop_path_rate": 0.0}  # NextViT drops paths by default, which no twin pass could repeat

# family -> hybrid models; the first one runs by default, the rest are slow
HYBRIDS: dict[str, tuple[Hybrid, ...]] = {
    "MobileNetV4 hybrid (multi-query attention, keys and values at half resolution)": (
        Hybrid("mobilenetv4_hybrid_medium"), Hybrid("mobilenetv4_hybrid_large")),
    "FastViT attention stages (attention over a map's tokens, conditional position encoding)": (
        Hybrid("fastvit_sa12"),),
    "EfficientFormerV2 (talking heads, attention biases, strided and downsampling attention)": (
        Hybrid("efficientformerv2_s0", size=128, timm_kwargs={"img_size": 128}, crop=_tables_cut_to(64)),),
    "NextViT (keys pooled in raster order, BatchNorm1d over tokens)": (
        Hybrid("nextvit_small", timm_kwargs=_NO_DROP,
               crop="keys pooled in raster order of the whole map group other tokens than the crop's"),),
    "EdgeNeXt (cross-covariance attention, Fourier position encoding)": (
        Hybrid("edgenext_xx_small", crop=_full_image_positions),
        Hybrid("edgenext_small_rw", crop=_full_image_positions)),
    "MobileViT (patches folded into the batch)": (Hybrid("mobilevit_xxs"), Hybrid("mobilevit_xs")),
    "SwiftFormer (additive attention)": (Hybrid("swiftformer_xs"), Hybrid("swiftformer_s")),
    "HaloNet (blocked attention with halos; default: 4x4 blocks at 128 px)": (
        Hybrid("halonet26t", size=128, timm_kwargs={"self_attn_kwargs": {"block_size": 4, "halo_size": 2}},
               crop=_HALO_PADDING),
        Hybrid("halonet26t", size=256, crop=_HALO_PADDING), Hybrid("eca_halonext26ts", size=256, crop=_HALO_PADDING)),
    "BoTNet (attention with relative position logits)": (
        Hybrid("botnet26t_256", size=128, timm_kwargs={"img_size": 128}, crop=_tables_cut_to(64)),
        Hybrid("eca_botnext26ts_256", size=128, timm_kwargs={"img_size": 128}, crop=_tables_cut_to(64))),
    "LambdaNet (lambda layers: keys softmaxed over positions, 3-D position convolution)": (
        Hybrid("lambda_resnet26t"), Hybrid("lambda_resnet50ts")),
    "PoolFormerV2 (GroupNorm over one group, StarReLU)": (Hybrid("poolformerv2_s12"), Hybrid("poolformer_s12")),
    "BiT (GroupNorm with activation, weight-standardised convolutions)": (
        Hybrid("resnetv2_50x1_bit", crop=_max_pool_padding_as_absent),),
}


def _hybrid_cases() -> list:
    cases = []
    for models in HYBRIDS.values():
        for i, case in enumerate(models):
            case_id = f"{case.name}-{case.size}px"
            cases.append(pytest.param(case, id=case_id, marks=[pytest.mark.slow] if i else []))
    return cases


@pytest.mark.parametrize("case", _hybrid_cases())
def test_hybrid_encoder_properties(case: Hybrid) -> None:
    reference, encoder = make_pair(case.name, dtype=torch.float64, perturb=0.2, **case.timm_kwargs)
    grid = case.size // encoder.downsample_ratio
    keep = max(KEEP, grid * grid // 2)
    check_full_mask_equals_dense(reference, encoder, train=True, size=case.size, batch=BATCH, rtol=RTOL)
    check_full_mask_equals_dense(reference, encoder, train=False, size=case.size, batch=BATCH, rtol=RTOL)
    check_zeros_and_no_leakage(encoder, size=case.size, batch=BATCH, keep=keep)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()):
        check_visible_batchnorm_statistics(encoder, size=case.size, batch=BATCH, keep=keep, rtol=RTOL)
    if callable(case.crop):
        check_central_crop(encoder, case.crop(reference), grid=case.crop_grid, rtol=RTOL)
    projections = _attention_projections(encoder.model)
    if projections:
        check_masked_keys_ignored(encoder, projections, size=case.size, batch=BATCH, keep=keep)
