"""Detectron2 configs: every shipped config loads and builds its model on CPU; table values; layer-decay groups;
the timm backbone; run adaptation; usage errors."""

import pytest
import torch

from downstream.det.backbone import TimmBackbone
from downstream.det.config import adapt_to_run, load_config, shipped_configs
from downstream.det.engine import DetTrainer
from downstream.det.optim import build_optimizer, param_groups
from pretrain.runtime.errors import UsageError

EXPECTED = {"mask_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_FPN_2x", "mask_rcnn_R_50_FPN_1x_published",
            "mask_rcnn_convnext_base_FPN_3x", "tiny"}


@pytest.fixture(scope="module")
def models() -> dict:
    """Every shipped config, adapted to one CPU process (fp32), with its model."""
    built = {}
    for name in shipped_configs():
        cfg = load_config(name)
        adapt_to_run(cfg, 1, "cpu")
        built[name] = (cfg, DetTrainer.build_model(cfg))
    return built


def test_every_shipped_config_builds_on_cpu(models):
    assert set(models) == EXPECTED
    for name, (cfg, model) in models.items():
        assert next(model.parameters()).device.type == "cpu", name
        assert cfg.MODEL.MASK_ON and cfg.SOLVER.OPTIMIZER == "ADAMW", name
        assert not any(type(m).__name__ == "SyncBatchNorm" for m in model.modules()), name  # BN on one process
        optimizer = build_optimizer(cfg, model)
        assert isinstance(optimizer, torch.optim.AdamW)
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_table_values(models):
    one, two, published = (models[n][0] for n in ("mask_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_FPN_2x",
                                                  "mask_rcnn_R_50_FPN_1x_published"))
    convnext = models["mask_rcnn_convnext_base_FPN_3x"][0]
    per_epoch = 117266 / 16  # train2017 images with annotations (Detectron2 and mmdet drop the others)
    for cfg, epochs, steps, warmup in ((one, 12, (9, 11), 0.05), (two, 24, (18, 22), 0.1),
                                       (convnext, 36, (27, 33), 500 / per_epoch)):  # ConvNeXt: mmdet's 500 iters
        assert abs(cfg.SOLVER.MAX_ITER - epochs * per_epoch) <= 1
        assert tuple(round(s * per_epoch) for s in steps) == cfg.SOLVER.STEPS
        assert round(warmup * per_epoch) == cfg.SOLVER.WARMUP_ITERS
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.GAMMA, cfg.SOLVER.LAYER_DECAY) == (2e-4, 0.2, 0.65)
    assert one.SOLVER.WEIGHT_DECAY == 1e-4 and convnext.SOLVER.WEIGHT_DECAY == 0.05
    assert one.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53] and one.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert one.INPUT.FORMAT == "RGB" and one.MODEL.BACKBONE.FREEZE_AT == 0 and not one.MODEL.RESNETS.STRIDE_IN_1X1
    assert (one.MODEL.ROI_BOX_HEAD.NUM_CONV, one.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
    assert one.INPUT.CROP.SIZE == [384, 600] and not one.INPUT.CROP.ENABLED
    assert (published.SOLVER.BASE_LR, published.SOLVER.LAYER_DECAY, published.SOLVER.GAMMA) == (2.5e-4, 0.6, 0.25)
    assert (published.SOLVER.MAX_ITER, published.SOLVER.STEPS) == (90000, (60000, 80000))
    assert (tuple(range(480, 801, 32)), 1333) == (convnext.INPUT.MIN_SIZE_TRAIN, convnext.INPUT.MAX_SIZE_TRAIN)


def _layer_of(groups: list[dict], model: torch.nn.Module) -> dict[str, int]:
    ids = {id(p): g["layer_id"] for g in groups for p in g["params"]}
    return {name: ids[id(p)] for name, p in model.named_parameters()}


def test_resnet50_layer_decay_follows_the_published_grouping(models):
    cfg, model = models["mask_rcnn_R_50_FPN_1x"]
    groups = param_groups(model, 1.0, 1e-4, 0.65)
    layer = _layer_of(groups, model)
    expected = {"backbone.bottom_up.stem.conv1.weight": 0, "backbone.bottom_up.res2.2.conv3.weight": 1,
                "backbone.bottom_up.res3.0.shortcut.weight": 2, "backbone.bottom_up.res4.2.conv1.weight": 3,
                "backbone.bottom_up.res4.3.conv1.weight": 4, "backbone.bottom_up.res5.0.conv1.weight": 5,
                "backbone.fpn_lateral2.weight": 6, "roi_heads.mask_head.predictor.weight": 6}
    assert {k: layer[k] for k in expected} == expected
    lrs = {g["layer_id"]: g["lr"] for g in groups}
    assert lrs[6] == 1.0 and lrs[0] == pytest.approx(0.65 ** 6)
    check_decay_only_on_weights(model, groups, 1e-4)


def check_decay_only_on_weights(model: torch.nn.Module, groups: list[dict], weight_decay: float) -> None:
    """Biases and other 1-D parameters get no weight decay, every other parameter ``weight_decay``: neither "decay
    everything" nor "decay nothing" passes."""
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(decay) == len(named)
    one_d = [n for n, p in named.items() if p.ndim == 1]
    assert one_d and [n for n in one_d if decay[id(named[n])] != 0] == []
    assert [n for n, p in named.items() if p.ndim > 1 and decay[id(p)] != weight_decay] == []


def test_convnext_layer_decay_has_twelve_backbone_layers(models):
    _, model = models["mask_rcnn_convnext_base_FPN_3x"]
    groups = param_groups(model, 1.0, 0.05, 0.65)
    check_decay_only_on_weights(model, groups, 0.05)
    layer = _layer_of(groups, model)
    body = "backbone.bottom_up.model."
    assert layer[body + "stem.0.weight"] == 0 and layer[body + "stages.0.blocks.2.conv_dw.weight"] == 1
    assert layer[body + "stages.2.downsample.1.weight"] == 3
    assert layer[body + "stages.2.blocks.26.conv_dw.weight"] == 11
    assert layer[body + "stages.3.blocks.0.conv_dw.weight"] == 12
    assert layer["roi_heads.box_predictor.bbox_pred.weight"] == 13


def test_timm_backbone_gives_four_fpn_inputs_at_strides_4_to_32(models):
    _, model = models["tiny"]
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, TimmBackbone) and bottom_up.model_name == "resnet18"
    shapes = bottom_up.output_shape()
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32] and [s.channels for s in shapes.values()] == [
        64, 128, 256, 512]
    with torch.no_grad():
        features = bottom_up(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert set(model.backbone.output_shape()) == {"p2", "p3", "p4", "p5", "p6"}
    convnext = models["mask_rcnn_convnext_base_FPN_3x"][1].backbone.bottom_up
    assert convnext.pruned == ("head.norm.bias", "head.norm.weight")  # nothing left without a gradient


def test_run_adaptation_of_synchronised_batchnorm():
    cfg = load_config("mask_rcnn_R_50_FPN_1x")
    notes = adapt_to_run(cfg, 1, "cpu")
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.FPN.NORM == cfg.MODEL.ROI_MASK_HEAD.NORM == "BN"
    assert any("SyncBN -> BN" in note for note in notes)
    cfg = load_config("mask_rcnn_R_50_FPN_1x")
    adapt_to_run(cfg, 2, "cpu")
    assert cfg.MODEL.FPN.NORM == "naiveSyncBN"  # torch's SyncBatchNorm is CUDA-only
    cfg = load_config("mask_rcnn_R_50_FPN_1x")
    adapt_to_run(cfg, 8, "cuda")
    assert cfg.MODEL.FPN.NORM == "SyncBN"


@pytest.mark.parametrize("config, overrides, message", [
    ("mask_rcnn_R_50_FPN_9x", (), "unknown config 'mask_rcnn_R_50_FPN_9x': not a file, nor one of"),
    ("tiny", ("SOLVER.MAX_ITER",), "KEY VALUE pairs"),
    ("tiny", ("SOLVER.NO_SUCH_KEY", "1"), "bad config override"),
])
def test_config_usage_errors(config, overrides, message):
    with pytest.raises(UsageError, match=message):
        load_config(config, overrides)


def test_stage_norms_normalise_every_output_and_the_layer_scale_init_reaches_the_model():
    """MODEL.TIMM.STAGE_NORM: each stage output goes through its fresh LayerNorm (weight 1, bias 0: zero mean and
    unit variance over channels at every pixel); MODEL.TIMM.LS_INIT_VALUE sets every block's layer scale."""
    backbone = TimmBackbone("convnext_atto", stage_norm="LN", ls_init_value=1.0)
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))
    assert len(features) == 4
    for feature in features.values():
        assert feature.mean(1).abs().max() < 1e-4 and (feature.var(1, unbiased=False) - 1).abs().max() < 1e-2
    gammas = [block.gamma for stage in backbone.model.stages for block in stage.blocks]
    assert gammas and all(bool((gamma == 1.0).all()) for gamma in gammas)
