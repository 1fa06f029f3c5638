"""The supervised baselines the paper quotes, as recipes: ``rsb-a2`` (Wightman et al. 2021, procedure A2) and
``convnext-in1k`` (Liu et al. 2022, ImageNet-1K training) resolve through the command line with their sources'
values, and ``--ls-init-value`` reaches the model."""

import json

import pytest
import torch

from downstream.cls.__main__ import main
from downstream.cls.config import BUNDLED_RECIPES, resolve_config
from downstream.cls.model import build_classifier
from pretrain.runtime.config import ConfigError


def _printed(capsys, *argv: str) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


RSB_A2 = {"input_size": 224, "crop_pct": 0.95, "epochs": 300, "warmup_epochs": 5, "global_batch": 2048, "opt": "lamb",
          "peak_lr": 5e-3, "weight_decay": 0.02, "aug_repeats": 3, "mixup": 0.1, "cutmix": 1.0, "smoothing": 0.0,
          "bce_loss": True, "reprob": 0.0, "drop_path": 0.05, "ema_decays": [], "layer_decay": None,
          "lamb_bias_correction": True, "lamb_always_adapt": False}
CONVNEXT_IN1K = {"input_size": 224, "crop_pct": 0.875, "epochs": 300, "warmup_epochs": 20, "global_batch": 4096,
                 "opt": "adamw", "peak_lr": 4e-3, "weight_decay": 0.05, "aug_repeats": 0, "aa": "rand-m9-mstd0.5-inc1",
                 "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "bce_loss": False, "reprob": 0.25,
                 "ema_decays": [0.9999], "layer_decay": None, "ls_init_value": 1e-6, "warmup_lr_ratio": 0.0}


@pytest.mark.parametrize(("recipe", "model", "expected", "drop_path"), [
    ("rsb-a2", "resnet50", RSB_A2, 0.05), ("rsb-a2", "resnet152", RSB_A2, 0.05),
    ("convnext-in1k", "convnext_small", CONVNEXT_IN1K, 0.4), ("convnext-in1k", "convnext_base", CONVNEXT_IN1K, 0.5),
    ("convnext-in1k", "convnext_large", CONVNEXT_IN1K, 0.5), ("convnext-in1k", "convnext_tiny", CONVNEXT_IN1K, 0.1)])
def test_baseline_recipes_print_their_sources_values(capsys, recipe, model, expected, drop_path):
    assert recipe in BUNDLED_RECIPES
    cfg = _printed(capsys, "--recipe", recipe, "--model", model)
    expected = {**expected, "drop_path": drop_path}
    assert {k: cfg[k] for k in expected} == expected
    assert (cfg["model"], cfg["protocol"], cfg["preset"]) == (model, "finetune", recipe)


def test_layer_scale_init_reaches_the_model():
    cfg = resolve_config("convnext-in1k", {"model": "convnext_atto", "ls_init_value": 0.5})
    model = build_classifier(cfg, 10)
    assert torch.all(model.stages[0].blocks[0].gamma == 0.5)
    with pytest.raises(ConfigError, match="ls_init_value"):
        build_classifier(resolve_config("rsb-a2", {"ls_init_value": 1.0}), 10)
