"""Optimiser parameter groups (what gets weight decay) and the per-iteration lr / weight-decay schedules."""

import math

import pytest
import torch
from timm.optim import Lamb

from pretrain.config import resolve_config
from pretrain.optim import build_optimizer, build_schedule, cosine
from pretrain.spark import build_spark


def _cfg(**overrides):
    base = {"model": "convnext_atto", "input_size": 64, "decoder_width": 64, "out": "unused"}
    return resolve_config("paper", {**base, **overrides}, check_model=False)


def _decay_by_name(model, optimizer) -> dict[str, float]:
    group_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters() if id(p) in group_of}


@pytest.fixture(scope="module")
def convnext_with_ape():
    return build_spark("convnext_atto", decoder_width=64, input_size=64, ape=True)


def test_no_weight_decay_on_biases_norms_tokens_embeddings_gammas(convnext_with_ape):
    model = convnext_with_ape
    optimizer = build_optimizer(model, _cfg(ape=True))
    decay = _decay_by_name(model, optimizer)
    assert len(decay) == len(list(model.parameters()))
    exempt = [n for n in decay if n.endswith((".bias", "mask_token", "pos_embed", "gamma")) or ".norm" in n]
    assert any(n.endswith("mask_token") for n in exempt) and any(n.endswith("pos_embed") for n in exempt)
    assert any(n.endswith("gamma") for n in exempt)
    assert all(decay[n] == 0.0 for n in exempt)
    weights = [n for n, p in model.named_parameters() if p.ndim == 4 and n not in exempt]
    assert weights and all(decay[n] == pytest.approx(0.04) for n in weights)


def test_frozen_parameters_are_left_out():
    model = build_spark("resnet18", decoder_width=64, input_size=64)
    model.decoder.proj.weight.requires_grad_(False)
    optimizer = build_optimizer(model, _cfg(model="resnet18"))
    assert id(model.decoder.proj.weight) not in {id(p) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize(("opt", "cls"), [("lamb", Lamb), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_timm_optimisers(opt, cls):
    model = build_spark("resnet18", decoder_width=64, input_size=64)
    optimizer = build_optimizer(model, _cfg(model="resnet18", opt=opt))
    assert isinstance(optimizer, cls)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * 4096 / 256)
    if opt == "lamb":  # the engine clips (and logs) the gradient norm; LAMB must not clip a second time
        assert optimizer.defaults["max_grad_norm"] is None
        assert optimizer.defaults["betas"] == (0.9, 0.95)  # ResNets: published beta2 0.95


def test_lr_warmup_cosine_and_weight_decay_cosine():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = _cfg(epochs=10, warmup_epochs=2, lr=1.0)
    optimizer = build_optimizer(model, cfg)
    schedule = build_schedule(optimizer, cfg, steps_per_epoch=10)  # 100 steps, 20 of warm-up
    values = [schedule.apply(step) for step in range(100)]
    lrs, wds = [v["lr"] for v in values], [v["weight_decay"] for v in values]
    assert lrs[0] == pytest.approx(cfg.warmup_lr_ratio)
    assert lrs[10] == pytest.approx(cfg.warmup_lr_ratio + (1 - cfg.warmup_lr_ratio) * 10 / 20)
    assert lrs[20] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    assert lrs[-1] < 0.01 and lrs[-1] >= cfg.min_lr_ratio
    assert wds[0] == pytest.approx(0.04) and wds[-1] == pytest.approx(0.2)
    assert all(a <= b for a, b in zip(wds, wds[1:]))
    by_decay = {g["initial_weight_decay"] > 0: g for g in optimizer.param_groups}
    assert by_decay[True]["weight_decay"] == pytest.approx(0.2) and by_decay[False]["weight_decay"] == 0.0
    assert all(g["lr"] == pytest.approx(lrs[-1]) for g in optimizer.param_groups)


def test_cosine_endpoints():
    assert cosine(1.0, 3.0, 0.0) == 1.0 and cosine(1.0, 3.0, 1.0) == 3.0
    assert cosine(1.0, 3.0, 0.5) == pytest.approx(2.0) and cosine(1.0, 3.0, 7.0) == 3.0
    assert math.isclose(cosine(0.0, 1.0, 0.25), 0.5 - 0.5 * math.cos(math.pi * 0.25))


def test_the_linear_recipe_steps_its_cosine_once_per_epoch():
    """MoCo v3's linear probe: lr = peak x 0.5 (1 + cos(pi epoch / epochs)), set at each epoch's start, no warm-up;
    the same schedule builder as every stage (pretrain.runtime.schedule), per epoch by the recipe's field."""
    from downstream.cls.config import resolve_config as resolve_cls
    from pretrain.runtime.schedule import build_schedule as shared

    cfg = resolve_cls("linear", {"epochs": 4})
    assert build_schedule is shared and not cfg.sched_on_updates and cfg.peak_lr == pytest.approx(0.4)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.peak_lr, momentum=0.9)
    schedule = build_schedule(optimizer, cfg, steps_per_epoch=3)
    lrs = [schedule(step)["lr"] for step in range(12)]
    expected = [0.4 * 0.5 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(4)]
    assert lrs == pytest.approx([lr for lr in expected for _ in range(3)])
    per_update = build_schedule(optimizer, resolve_cls("linear", {"epochs": 4, "sched_on_updates": True}), 3)
    assert len({round(per_update(step)["lr"], 12) for step in range(3)}) == 3  # the default: every step
