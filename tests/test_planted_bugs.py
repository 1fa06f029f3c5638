"""The test of the tests: each bug below is planted (monkeypatched into the code under test, for this test only) and
the check that the suite's real test runs must fail on it. A check that passed with its bug planted could not fail.

| planted bug | the suite's test that runs the check |
|---|---|
| gather backend: padding taps of the 3x3 block convolutions not zeroed | test_gather (float64 and fp32 cases) |
| zero-outing in place of sparse BatchNorm (statistics over all sites) | test_encoder::test_batchnorm_statistics_... |
| the same only under bf16 autocast | test_amp::test_bf16_channels_last_matches_fp32_... |
| Detectron2 converter swapping bn1 and bn2 of every block | test_convert::test_detectron2_pickle_holds_... |
| two encoders sharing one mask context | test_encoder::test_two_encoders_do_not_share_masks |
| fine-tuning's optimiser decaying biases and norms (both paths) | test_cls::test_no_weight_decay_on_biases... |
| detection's optimiser decaying everything, or nothing | test_det_config::test_*_layer_decay_* |
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable

import pytest
import timm
import torch
from encoder_properties import BRANCH_NOISE, check_visible_batchnorm_statistics, make_pair
from torch import nn

import pretrain.encoder
import pretrain.gather
import pretrain.sparse
from pretrain.mask_context import SparsityContext


def _gather_padding_not_zeroed(monkeypatch, tmp_path) -> None:
    from test_gather import check_backends_agree

    correct = pretrain.gather._grouped_columns

    def planted(tokens, index, outside, sites, groups):
        if index.numel() // sites == 9:  # a 3x3 convolution (ResNet blocks): its padding taps read border rows
            outside = outside[:0]
        return correct(tokens, index, outside, sites, groups)

    monkeypatch.setattr(pretrain.gather, "_grouped_columns", planted)
    check_backends_agree("resnet18")


def _dense_batchnorm(bf16_only: bool) -> Callable:
    correct = pretrain.sparse.masked_batch_norm

    def planted(bn, x, mask, sync=True, sites=None):
        if bf16_only and x.dtype != torch.bfloat16:
            return correct(bn, x, mask, sync, sites)
        out = nn.BatchNorm2d.forward(bn, x)  # zero-outing: statistics over all sites, masked ones included
        return out if mask is None else out * mask

    return planted


def _zero_outing_batchnorm(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(pretrain.sparse, "masked_batch_norm", _dense_batchnorm(bf16_only=False))
    _, encoder = make_pair("resnet18", perturb=BRANCH_NOISE)
    check_visible_batchnorm_statistics(encoder, size=96, batch=2, keep=4)


def _zero_outing_batchnorm_in_bf16(monkeypatch, tmp_path) -> None:
    from test_amp import check_bf16_matches_fp32, noised_spark

    monkeypatch.setattr(pretrain.sparse, "masked_batch_norm", _dense_batchnorm(bf16_only=True))
    model = noised_spark("resnet18")
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    check_bf16_matches_fp32(model, images, model.mask(4, "cpu", generator=torch.Generator().manual_seed(0)))


def _swapped_bn1_bn2_in_the_detectron2_converter(monkeypatch, tmp_path) -> None:
    from test_convert import check_detectron2_conversion, distinct_state

    import downstream.convert.to_detectron2 as to_d2
    from downstream.det.config import adapt_to_run, load_config
    from pretrain.checkpoint import encoder_payload

    cfg = load_config("mask_rcnn_R_50_FPN_1x")  # (imports Detectron2 with the suite's shims)
    adapt_to_run(cfg, 1, "cpu")
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    import pretrain.weights.detectron2 as d2_names

    correct = d2_names._rename
    swap = {".bn1.": ".bn2.", ".bn2.": ".bn1."}

    def planted(key: str, rules):
        if rules is d2_names._FORWARD:  # timm -> Detectron2 only: bn1 and bn2 of every block trade places
            key = next((key.replace(a, b) for a, b in swap.items() if a in key), key)
        return correct(key, rules)

    monkeypatch.setattr(d2_names, "_rename", planted)
    state = distinct_state("resnet50")
    torch.save(encoder_payload(state, "resnet50", {}), tmp_path / "r50.pth")
    to_d2.convert_to_detectron2(tmp_path / "r50.pth", tmp_path / "r50.pkl")
    d2_keys = set(build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict())
    with open(tmp_path / "r50.pkl", "rb") as handle:
        assert len(pickle.load(handle)["model"]) == 318  # every key still maps: only values betray the swap
    check_detectron2_conversion(tmp_path / "r50.pkl", state, d2_keys)


def _shared_mask_context(monkeypatch, tmp_path) -> None:
    from test_encoder import check_encoders_keep_their_own_masks

    shared = SparsityContext()
    monkeypatch.setattr(pretrain.encoder, "SparsityContext", lambda: shared)  # one context for every encoder
    a, b = (make_pair("resnet18", perturb=BRANCH_NOISE)[1] for _ in range(2))
    assert a.sparsity is b.sparsity
    check_encoders_keep_their_own_masks(a, b)


def _fine_tuning_decays_everything(recipe: str) -> Callable:
    def plant(monkeypatch, tmp_path) -> None:
        from test_cls import check_no_decay_on_biases_and_norms

        import downstream.cls.runner as runner
        from downstream.cls.config import resolve_config

        published = runner.published_param_groups

        def decay_all(model, weight_decay, layer_decay):
            return [{**g, "weight_decay": weight_decay} for g in published(model, weight_decay, layer_decay)]

        monkeypatch.setattr(runner, "published_param_groups", decay_all)
        monkeypatch.setattr(runner, "create_optimizer_v2",
                            functools.partial(runner.create_optimizer_v2, filter_bias_and_bn=False))
        cfg = resolve_config(recipe, {"model": "resnet18"})
        model = timm.create_model("resnet18", num_classes=10)
        check_no_decay_on_biases_and_norms(model, runner.build_optimizer(model, cfg), cfg.weight_decay)

    return plant


def _detection_decays(value: float | None) -> Callable:
    def plant(monkeypatch, tmp_path) -> None:
        from test_det_config import check_decay_only_on_weights

        from downstream.det.config import adapt_to_run, load_config
        from downstream.det.engine import DetTrainer
        from downstream.det.optim import param_groups

        cfg = load_config("tiny")
        adapt_to_run(cfg, 1, "cpu")
        model = DetTrainer.build_model(cfg)
        groups = param_groups(model, 1.0, 1e-4, 0.65)
        for group in groups:  # the plant: one decay for every group
            group["weight_decay"] = 1e-4 if value is None else value
        check_decay_only_on_weights(model, groups, 1e-4)

    return plant


PLANTS = {
    "gather-padding": _gather_padding_not_zeroed,
    "zero-outing-batchnorm": _zero_outing_batchnorm,
    "zero-outing-batchnorm-bf16": _zero_outing_batchnorm_in_bf16,
    "detectron2-bn1-bn2-swapped": _swapped_bn1_bn2_in_the_detectron2_converter,
    "shared-mask-context": _shared_mask_context,
    "finetune-decay-everything-timm-groups": _fine_tuning_decays_everything("table7"),
    "finetune-decay-everything-published-groups": _fine_tuning_decays_everything("table7-code"),
    "detection-decay-everything": _detection_decays(None),
    "detection-decay-nothing": _detection_decays(0.0),
}


@pytest.mark.parametrize("plant", list(PLANTS.values()), ids=list(PLANTS))
def test_the_check_fails_with_the_bug_planted(plant, monkeypatch, tmp_path) -> None:
    with pytest.raises(AssertionError):
        plant(monkeypatch, tmp_path)
