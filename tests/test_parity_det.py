"""Parity of the COCO optimisers and schedules with the published code, rule by rule (:mod:`published_rules`).

ResNet-50 (table 9 and its published variant) against the published Detectron2 code (downstream_d2/lr_decay.py
``lr_factor_func`` inside Detectron2 0.6's ``get_default_optimizer_params``), ConvNeXt-B (table 10) against the
ConvNeXt repository's MMDetection ``LearningRateDecayOptimizerConstructor``: the lr and weight decay of every
parameter, exactly (lr to 1e-12 relative). And the ConvNeXt schedule against mmcv's step policy with linear warm-up.
Models are built on the meta device: only names, shapes and module types matter.
"""

import published_rules as ref
import pytest
import torch

from downstream.det.config import adapt_to_run, load_config  # applies the Detectron2 compatibility shims
from downstream.det.engine import DetTrainer

# --- the suite, each entry point in one place


def _suite_groups(cfg, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """``name -> (lr, weight decay)`` of the optimiser the detection trainer builds for ``cfg``."""
    from downstream.det.optim import build_optimizer

    optimizer = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups
            for p in group["params"]}


def _suite_lr_factor(cfg, iteration: int) -> float:
    """The lr multiplier of Detectron2's scheduler for ``cfg`` at ``iteration``, as the trainer builds it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = DetTrainer.build_lr_scheduler(cfg, optimizer)
    scheduler.last_epoch = iteration
    return scheduler.get_lr()[0]


# --- helpers


def _meta_model(config: str):
    cfg = load_config(config)
    adapt_to_run(cfg, 1, "cpu")  # SyncBN -> BN on one process: the norm classes the published rule names
    cfg.MODEL.DEVICE = "meta"
    return cfg, DetTrainer.build_model(cfg)


def _compare(suite: dict, expected: dict) -> None:
    assert suite.keys() == expected.keys()
    wrong = {n: (suite[n], e) for n, e in expected.items()
             if suite[n][1] != e[1] or suite[n][0] != pytest.approx(e[0], rel=1e-12, abs=0)}
    assert not wrong, f"{len(wrong)} of {len(expected)} parameters differ (suite, published): {list(wrong.items())[:3]}"


@pytest.fixture(scope="module")
def resnet50():
    return _meta_model("mask_rcnn_R_50_FPN_1x")


@pytest.mark.parametrize("config", ["mask_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_FPN_1x_published"])
def test_resnet50_groups_follow_the_published_detectron2_rule(resnet50, config):
    cfg = load_config(config)
    _, model = resnet50
    solver = cfg.SOLVER
    expected = ref.d2_groups(model, solver.BASE_LR, solver.WEIGHT_DECAY, solver.LAYER_DECAY, solver.WEIGHT_DECAY_NORM,
                             solver.WEIGHT_DECAY_BIAS)
    _compare(_suite_groups(cfg, model), expected)
    decays = {n: wd for n, (_, wd) in expected.items()}
    assert decays["roi_heads.box_predictor.cls_score.bias"] == 1e-4  # biases decay as in Detectron2 0.6
    assert decays["backbone.bottom_up.res2.0.conv1.norm.weight"] == 0.0  # norm layers do not
    assert len({lr for lr, _ in expected.values()}) == 7  # stem, res2, res3, res4 in two, res5, the rest


def test_convnext_groups_follow_mmdetections_layer_decay_rule():
    cfg, model = _meta_model("mask_rcnn_convnext_base_FPN_3x")
    named = list(model.named_parameters())
    expected = ref.mmdet_groups([(ref.mmdet_name(n), p) for n, p in named], cfg.SOLVER.BASE_LR,
                                cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.LAYER_DECAY, num_layers=12)
    suite = {ref.mmdet_name(n): v for n, v in _suite_groups(cfg, model).items()}
    _compare(suite, expected)
    assert all(expected[f"backbone.norm{i}.weight"][0] == cfg.SOLVER.BASE_LR for i in range(4))  # full lr
    assert len({lr for lr, _ in expected.values()}) == 14  # 12 backbone layers, stem, the rest


def test_convnext_schedule_is_mmdets_step_policy_with_linear_warmup():
    """mmcv's LrUpdater (step policy, warmup 'linear'): the regular lr drops x gamma at each step boundary; during
    warm-up it is scaled by ``1 - (1 - i / warmup_iters) * (1 - warmup_ratio)``."""
    cfg = load_config("mask_rcnn_convnext_base_FPN_3x")
    solver = cfg.SOLVER
    warmup, ratio, steps = 500, 0.001, solver.STEPS
    assert (warmup, ratio, "linear") == (solver.WARMUP_ITERS, solver.WARMUP_FACTOR, solver.WARMUP_METHOD)
    for iteration in (0, 1, 250, 499, 500, 501, steps[0] - 1, steps[0], steps[1] - 1, steps[1], solver.MAX_ITER - 1):
        regular = solver.GAMMA ** sum(iteration >= s for s in steps)
        factor = 1 - (1 - iteration / warmup) * (1 - ratio) if iteration < warmup else 1.0
        assert _suite_lr_factor(cfg, iteration) == pytest.approx(regular * factor, rel=1e-9), iteration
