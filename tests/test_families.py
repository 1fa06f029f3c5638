"""Any timm convnet, really: the sparse encoder's properties over many timm families, and the families it
refuses when it is built.

Every model runs in float64 (so tolerances can be tight without BatchNorm conditioning worries) with noise
added to its biases, norm affines and layer scales (see ``make_pair``), on 64 px inputs (2x2 patches) and,
for the visible-averaging property, 128 px (4x4 patches). The first model of each family is in the default
set, so ``make test`` exercises every family; the other variants are ``slow``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from encoder_properties import (
    check_full_mask_equals_dense,
    check_visible_averaging,
    check_visible_batchnorm_statistics,
    check_zeros_and_no_leakage,
    make_pair,
)

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

# family -> (a model, the layer class named in its one-line refusal)
REFUSED: dict[str, tuple[str, str]] = {
    "EdgeNeXt (cross-covariance attention)": ("edgenext_xx_small", "CrossCovarianceAttn"),
    "FastViT attention stages": ("fastvit_sa12", "Attention"),
    "MobileNetV4 hybrid (multi-query attention)": ("mobilenetv4_hybrid_medium", "MultiQueryAttention2d"),
    "MobileViT (transformer blocks)": ("mobilevit_xxs", "Attention"),
    "MobileViTV2 / PoolFormerV2 (GroupNorm)": ("poolformerv2_s12", "GroupNorm"),
    "BoTNet / HaloNet / LambdaNet (self-attention)": ("halonet26t", "HaloAttn"),
    "SwiftFormer (additive attention)": ("swiftformer_xs", "EfficientAdditiveAttention"),
}


def _cases() -> list:
    cases = []
    for models in FAMILIES.values():
        cases.append(pytest.param(models[0], id=models[0]))
        cases += [pytest.param(m, id=m, marks=pytest.mark.slow) for m in models[1:]]
    return cases


def test_the_family_table_has_the_models_and_families_the_readme_claims() -> None:
    models = [m for family in FAMILIES.values() for m in family]
    claim = re.search(r"Tested on (\d+) timm models in (\d+) families", (REPO / "README.md").read_text())
    assert claim, "the README no longer states how many models and families are tested"
    assert (len(models), len(FAMILIES)) == (int(claim[1]), int(claim[2]))
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
