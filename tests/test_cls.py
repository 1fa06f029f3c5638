"""``python -m downstream.cls``: recipes, errors, a pretrain -> convert -> fine-tune -> evaluate chain, linear
probing, exact resumption after SIGKILL and SIGTERM, and ``model_best.pth`` (timm's checkpoint layout, read by timm's
``load_checkpoint`` and by detection).

Real timm, real files: a 3-class generated image set at 64 px (24 train / 12 val images), the session's tiny SparK
pretraining of a ResNet-18 (``spark_run`` in conftest.py), fine-tuned for 2 epochs of 6 steps.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from downstream.cls.__main__ import main, run
from downstream.cls.best import BEST, BestWeightsHook
from downstream.cls.config import resolve_config
from downstream.convert.__main__ import main as convert_main
from pretrain.data import make_demo_dataset
from pretrain.info import model_info
from pretrain.runtime.distributed import DistEnv
from pretrain.runtime.result import read_metrics
from pretrain.runtime.signals import StopRequest
from pretrain.weights import read_weights

REPO = Path(__file__).resolve().parents[1]
EPOCHS, STEPS = 2, 6  # 24 train images in batches of 4
FT = ["--recipe", "tiny", "--input-size", "64", "--batch-size", "4", "--global-batch", "4", "--eval-batch-size", "8",
      "--epochs", str(EPOCHS), "--warmup-epochs", "1", "--workers", "0", "--amp", "none", "--channels-last", "off",
      "--log-every", "1", "--deterministic", "--no-progress", "--no-tensorboard"]


def _printed(capsys, *argv: str) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def _last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error printed"
    return lines[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_classes=3, train_per_class=8,
                             val_per_class=4, image_size=64)


@pytest.fixture(scope="module")
def weights(spark_run, tmp_path_factory) -> Path:
    """The session's SparK-pretrained ResNet-18 (12 steps at 64 px), converted for timm."""
    converted = tmp_path_factory.mktemp("converted") / "resnet18-timm.pth"
    assert convert_main(["timm", str(spark_run / "checkpoint-last.pth"), str(converted)]) == 0
    return converted


def _finetune_argv(data: Path, weights: Path | str, out: Path, *extra: str) -> list[str]:
    return [*FT, "--data", str(data), "--weights", str(weights), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(data, weights, tmp_path_factory) -> Path:
    """An uninterrupted fine-tuning run (in-process, as the sweep calls it)."""
    out = tmp_path_factory.mktemp("reference")
    outcome = run(_finetune_argv(data, weights, out, "--save-every", "2"))
    assert (outcome.status, outcome.out) == ("completed", str(out))
    return out


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- recipes and the command line


def test_table7_prints_the_papers_values(capsys):
    cfg = _printed(capsys, "--recipe", "table7", "--model", "resnet50")
    expected = {"input_size": 224, "crop_pct": 0.95, "epochs": 300, "global_batch": 2048, "opt": "lamb",
                "peak_lr": 8e-3, "weight_decay": 0.02, "aug_repeats": 3, "aa": "rand-m7-mstd0.5", "drop": 0.0,
                "clip_grad": 0.0, "bce_loss": True, "mixup": 0.1, "cutmix": 1.0, "smoothing": 0.1,
                "ema_decays": [0.99, 0.999], "layer_decay": None, "drop_path": 0.05, "warmup_epochs": 5,
                "protocol": "finetune", "preset": "table7"}
    assert {k: cfg[k] for k in expected} == expected
    assert _printed(capsys, "--recipe", "table7", "--model", "resnet152")["drop_path"] == 0.2  # published code


def test_table8_prints_the_papers_values(capsys):
    cfg = _printed(capsys, "--recipe", "table8", "--model", "convnext_small")
    expected = {"input_size": 224, "crop_pct": 0.95, "epochs": 200, "global_batch": 2048, "opt": "adamw",
                "peak_lr": 3.2e-3, "weight_decay": 0.01, "aug_repeats": 3, "aa": "rand-m9-mstd0.5-inc1",
                "drop": 0.0, "clip_grad": 0.0, "bce_loss": False, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
                "ema_decays": [0.99, 0.999], "layer_decay": None, "drop_path": 0.3, "warmup_epochs": 20}
    assert {k: cfg[k] for k in expected} == expected
    assert _printed(capsys, "--model", "convnext_large")["preset"] == "table8"  # the default recipe by family


def test_code_recipes_print_the_published_values(capsys):
    r50 = _printed(capsys, "--recipe", "table7-code", "--model", "resnet50")
    assert (r50["peak_lr"], r50["layer_decay"], r50["layer_decay_groups"], r50["aug_repeats"], r50["ema_decays"],
            r50["aa"], r50["reprob"], r50["lamb_bias_correction"], r50["epochs"]) == \
        (0.016, 0.7, "published", 0, [0.9999], "trivialaugment-wide", 0.25, False, 300)
    r101 = _printed(capsys, "--recipe", "table7-code", "--model", "resnet101")
    assert (r101["peak_lr"], r101["layer_decay"], r101["drop_path"]) == (8e-3, 0.8, 0.2)
    small = _printed(capsys, "--recipe", "table8-code", "--model", "convnext_small")
    assert (small["global_batch"], small["epochs"], small["peak_lr"], small["layer_decay"], small["aug_repeats"],
            small["ema_decays"]) == (4096, 400, 3.2e-3, 0.7, 3, [0.9999])
    large = _printed(capsys, "--recipe", "table8-code", "--model", "convnext_large")
    assert (large["epochs"], large["warmup_epochs"], large["peak_lr"], large["weight_decay"], large["drop_path"]) == \
        (200, 10, 1.6e-3, 0.02, 0.5)
    hires = _printed(capsys, "--recipe", "table8-code-384")
    assert (hires["model"], hires["input_size"], hires["global_batch"], hires["peak_lr"], hires["ema_decays"],
            hires["crop_mode"]) == ("convnext_large", 384, 1024, pytest.approx(2.4e-4), [0.99995], "squash")


def test_overrides_show_up_and_the_lr_scales_with_the_global_batch(capsys):
    cfg = _printed(capsys, "--recipe", "table7", "--global-batch", "1024", "--batch-size", "128", "--aa", "none",
                   "--ema-decays", "0.9", "--epochs", "30")
    assert (cfg["peak_lr"], cfg["grad_accum_steps"], cfg["aa"], cfg["ema_decays"], cfg["epochs"]) == \
        (4e-3, 8, None, [0.9], 30)
    assert _printed(capsys, "--recipe", "table7", "--lr", "0.1")["peak_lr"] == 0.1
    linear = _printed(capsys, "--protocol", "linear")
    assert (linear["preset"], linear["opt"], linear["peak_lr"], linear["ema_decays"], linear["mixup"]) == \
        ("linear", "momentum", 0.1 * 1024 / 256, [], 0.0)
    assert resolve_config("tiny", {"ema_decays": [0]}).ema_decays == ()  # 0: no EMA


@pytest.mark.parametrize(("argv", "message"), [
    (["--recipe", "table9"], "unknown recipe 'table9'; choose one of convnext-in1k, linear, rsb-a2, table7, "
                             "table7-code, table8, table8-code, table8-code-384, tiny"),
    (["--recipe", "tiny", "--global-batch", "30", "--batch-size", "4"], "global_batch 30 is not a multiple"),
    (["--recipe", "tiny", "--ema-decays", "1.5"], "ema_decays must lie in [0, 1)"),
    (["--recipe", "tiny", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--recipe", "tiny"], "--out is required"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in _last_error(capsys)


def test_config_imports_no_torch():
    code = ("import sys, downstream.cls.config as c; c.resolve_config('table8-code', {'model': 'convnext_base'}); "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- optimiser, schedule, losses, augmentation, linear-probe head


def check_no_decay_on_biases_and_norms(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                       weight_decay: float) -> None:
    """Every trained parameter is in exactly one group; the 1-D ones (biases, norm affines) get no weight decay
    and every other one gets ``weight_decay`` (so neither "decay everything" nor "decay nothing" passes)."""
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(decay) == sum(len(g["params"]) for g in optimizer.param_groups) == len(trained)
    one_d = [name for name, p in trained.items() if p.ndim <= 1]
    assert len(one_d) >= 2 and len(one_d) < len(trained)  # both kinds are there to check
    assert [n for n in one_d if decay[id(trained[n])] != 0] == [], "weight decay on biases or norms"
    assert [n for n, p in trained.items() if p.ndim > 1 and decay[id(p)] != pytest.approx(weight_decay)] == []


@pytest.mark.parametrize("recipe, overrides", [
    ("table7", {}),  # timm's own groups, no layer decay
    ("table8-code", {"layer_decay_groups": "timm"}),  # timm's layer decay groups (0.7)
    ("table8-code", {}),  # the published layer decay groups (0.7)
])
def test_no_weight_decay_on_biases_and_norms(recipe, overrides):
    from downstream.cls.runner import build_optimizer

    cfg = resolve_config(recipe, {"model": "resnet18", **overrides})
    model = timm.create_model("resnet18", num_classes=10)
    check_no_decay_on_biases_and_norms(model, build_optimizer(model, cfg), cfg.weight_decay)


def test_schedule_warms_up_from_half_a_percent_of_the_peak_then_cosine_to_a_tenth_of_a_percent():
    from downstream.cls.runner import build_optimizer, build_schedule

    cfg = resolve_config("table7", {"model": "resnet18", "epochs": 10, "warmup_epochs": 2})
    assert (cfg.warmup_lr_ratio, cfg.min_lr_ratio) == (0.005, 0.001)
    schedule = build_schedule(build_optimizer(timm.create_model("resnet18", num_classes=10), cfg), cfg, 10)
    peak, lowest = cfg.peak_lr, cfg.peak_lr * 0.001
    lrs = [schedule(step)["lr"] for step in range(100)]  # 20 warm-up steps, then 80 of cosine
    for step in (0, 7, 19):
        assert lrs[step] == pytest.approx(peak * (0.005 + 0.995 * step / 20))
    for step in (20, 50, 99):  # the floor at the last step, as the published lr_wd_annealing
        cosine = lowest + (peak - lowest) * 0.5 * (1 + math.cos(math.pi * (step - 20) / 79))
        assert lrs[step] == pytest.approx(cosine)
    assert lrs[20] == pytest.approx(peak) and min(lrs) >= lowest and lrs[-1] == pytest.approx(lowest)


@pytest.mark.parametrize("recipe, criterion, mixing", [
    ("table7", BinaryCrossEntropy, True),  # BCE on mixed targets: the smoothing is in the targets, not the loss
    ("table8", SoftTargetCrossEntropy, True),
    ("linear", torch.nn.CrossEntropyLoss, False),
])
def test_losses_and_mixed_targets_follow_the_recipe(recipe, criterion, mixing):
    from downstream.cls.task import ClsTask, build_criterion, build_mixup

    cfg = resolve_config(recipe, {"model": "resnet18"})
    mixup = build_mixup(cfg, 5)
    loss = build_criterion(cfg, mixup is not None)
    assert type(loss) is criterion and (mixup is not None) == mixing
    if not mixing:
        return
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (cfg.mixup, cfg.cutmix, 0.1)
    if criterion is BinaryCrossEntropy:
        assert loss.smoothing == 0.0  # not smoothed twice
    seen = {}

    def logits(images):
        seen["images"] = images
        return torch.zeros(images.shape[0], 5)

    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    np.random.seed(0)  # timm's Mixup draws from NumPy's global generator
    value = ClsTask(logits, loss, mixup).loss(images.clone(), labels, torch.Generator())
    np.random.seed(0)
    mixed, targets = build_mixup(cfg, 5)(images.clone(), labels)
    assert torch.equal(seen["images"], mixed) and not torch.equal(mixed, images)  # mixup or cutmix applied
    assert torch.allclose(targets.sum(1), torch.ones(6)) and targets.min() >= 0.1 / 5 - 1e-6  # smoothed, mixed
    assert value == pytest.approx(float(loss(torch.zeros(6, 5), targets)))


@pytest.mark.parametrize("recipe, expected", [
    ("tiny", ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment", "MaybeToTensor",
              "Normalize"]),
    ("table7-code", ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "TrivialAugmentWide",
                     "MaybeToTensor", "Normalize", "RandomErasing"]),
])
def test_training_augmentations_are_applied(data, recipe, expected):
    from downstream.cls.data import build_data

    cfg = resolve_config(recipe, {"model": "resnet18", "data": str(data), "input_size": 64})
    train = build_data(cfg).train
    steps = train.transform.transforms
    assert [type(t).__name__ for t in steps] == expected
    assert tuple(steps[0].scale) == tuple(cfg.scale)
    if recipe == "tiny":
        assert (tuple(cfg.scale), steps[2].ops[0].magnitude) == ((0.5, 1.0), 7)  # RandAug m7, crop 0.5..1
    else:
        assert steps[-1].probability == 0.25
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(3)]
    assert draws[0].shape == (3, 64, 64) and not torch.equal(draws[0], draws[1])  # random per draw


def test_linear_probe_head_is_a_new_normal_0_01_layer_and_the_only_trained_one():
    from downstream.cls.model import build_classifier, freeze_backbone

    model = build_classifier(resolve_config("linear", {"model": "resnet18"}), 1000)
    assert freeze_backbone(model) == ["fc.weight", "fc.bias"]
    weight = model.fc.weight.detach()
    assert abs(float(weight.std()) - 0.01) < 5e-4 and abs(float(weight.mean())) < 1e-4
    assert torch.count_nonzero(model.fc.bias) == 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


# --- layer-wise lr decay of the published code


def test_published_layer_decay_groups():
    from downstream.cls.layer_decay import published_layer_ids
    from downstream.cls.runner import build_optimizer

    resnet = timm.create_model("resnet50", num_classes=10)
    layer, count = published_layer_ids(resnet)
    names = {"conv1.weight": 0, "bn1.bias": 0, "layer1.2.conv1.weight": 1, "layer2.1.bn1.weight": 2,
             "layer2.2.conv3.weight": 3, "layer3.2.conv1.weight": 4, "layer3.3.conv1.weight": 5,
             "layer4.0.downsample.0.weight": 6, "fc.weight": 7}
    assert count == 8 and {name: layer(name) for name in names} == names
    cfg = resolve_config("table7-code", {"model": "resnet50"})
    optimizer = build_optimizer(resnet, cfg)
    scales = {round(g["lr_scale"], 6) for g in optimizer.param_groups}
    assert scales == {round(0.7 ** (7 - i), 6) for i in range(8)}
    check_no_decay_on_biases_and_norms(resnet, optimizer, cfg.weight_decay)
    timm_groups = build_optimizer(resnet, resolve_config("table7-code", {"model": "resnet50",
                                                                         "layer_decay_groups": "timm"}))
    assert len({g["lr_scale"] for g in timm_groups.param_groups}) > 8  # timm: one layer per block
    check_no_decay_on_biases_and_norms(resnet, timm_groups, cfg.weight_decay)

    with torch.device("meta"):
        convnext = timm.create_model("convnext_small")
    layer, count = published_layer_ids(convnext)
    names = {"stem.0.weight": 0, "stages.0.blocks.2.gamma": 1, "stages.1.downsample.1.weight": 2,
             "stages.2.downsample.1.weight": 3, "stages.2.blocks.2.conv_dw.weight": 3,
             "stages.2.blocks.26.mlp.fc1.weight": 11, "stages.3.downsample.0.weight": 12, "head.fc.weight": 13}
    assert count == 14 and {name: layer(name) for name in names} == names


# --- bad input: one line, exit 1, nothing trained


def _copy_split(source: Path, target: Path, flat: bool = False, per_class: int = 2) -> None:
    """The first images of each class of ``source`` in ``target`` (class folders, or all in ``target`` if flat)."""
    for folder in sorted(source.iterdir()):
        destination = target if flat else target / folder.name
        destination.mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir())[:per_class]:
            (destination / f"{folder.name}-{image.name}").write_bytes(image.read_bytes())


BAD_INPUT = {
    "missing": "data root does not exist",
    "no-val": "has no val/ folder",
    "flat-train": "holds images but no class sub-folders",
    "other-classes": "only in val/: zebra",
    "other-arch": "holds resnet18 weights; the model is resnet34",
    "no-weights": "--weights is required",
    "eval-without-head": "--eval-only needs a trained classifier",
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUT))
def test_bad_input_is_one_line_before_training(capsys, tmp_path, data, weights, problem):
    root = tmp_path / "root"
    if problem != "missing":
        _copy_split(data / "train", root / "train", flat=problem == "flat-train")
    if problem not in ("missing", "no-val"):
        _copy_split(data / "val", root / "val")
    if problem == "other-classes":
        next((root / "val").iterdir()).rename(root / "val" / "zebra")
    argv = _finetune_argv(root, "" if problem == "no-weights" else weights, tmp_path / "out",
                          "--model", "resnet34" if problem == "other-arch" else "resnet18",
                          *(["--eval-only"] if problem == "eval-without-head" else []))
    if problem == "no-weights":  # a usage error
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    else:
        assert main(argv) == 1
    error = _last_error(capsys)
    assert error.startswith("python -m downstream.cls: error:") and BAD_INPUT[problem] in error
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("problem, expected", [
    ("unexpected-key", "1 unexpected (layer5.0.conv1.weight)"),
    ("other-shape", "1 of another shape (conv1.weight (64, 3, 3, 3) vs (64, 3, 7, 7))"),
])
def test_weights_that_do_not_fit_are_one_line_errors(capsys, tmp_path, data, weights, problem, expected):
    payload = torch.load(weights, weights_only=True)
    if problem == "unexpected-key":
        payload["state_dict"]["layer5.0.conv1.weight"] = torch.zeros(1)
    else:
        payload["state_dict"]["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(payload, tmp_path / "bad.pth")
    assert main(_finetune_argv(data, tmp_path / "bad.pth", tmp_path / "out")) == 1
    error = _last_error(capsys)
    assert "does not fit timm resnet18" in error and expected in error
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_an_out_folder_with_a_checkpoint_needs_resume(capsys, tmp_path, data, weights):
    (tmp_path / "checkpoint-last.pth").write_bytes(b"earlier run")
    with pytest.raises(SystemExit) as exit_info:
        main(_finetune_argv(data, weights, tmp_path))
    assert exit_info.value.code == 2
    error = _last_error(capsys)
    assert "already holds" in error and "pass --resume auto" in error
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == b"earlier run"


# --- a complete chain: pretrain -> convert -> fine-tune -> evaluate


def _val_predictions(data: Path, state: dict, num_classes: int) -> list[tuple[int, int]]:
    """(predicted, true) label of every val image, computed here with timm's own test transform."""
    model = timm.create_model("resnet18", num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    model.eval()
    transform = create_transform(input_size=64, is_training=False, interpolation="bicubic", crop_pct=0.95)
    classes = sorted(p.name for p in (data / "val").iterdir())
    pairs = []
    with torch.no_grad():
        for label, name in enumerate(classes):
            for path in sorted((data / "val" / name).iterdir()):
                image = transform(Image.open(path).convert("RGB")).unsqueeze(0)
                pairs.append((int(model(image).argmax()), label))
    return pairs


def test_complete_run_outputs_and_accuracy_from_real_predictions(reference, data, weights):
    names = {p.name for p in reference.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint-last.pth", "result.json"} <= names
    result = json.loads((reference / "result.json").read_text())
    assert (result["stage"], result["model"], result["status"]) == ("cls", "resnet18", "completed")
    assert result["inputs"]["weights"] == str(weights.resolve())
    assert result["config"] == json.loads((reference / "config.json").read_text())
    assert result["config"]["num_classes"] == 3 and result["config"]["precision"]["amp"] == "none"
    metrics = result["metrics"]
    info = model_info("resnet18", 64)
    assert (metrics["params_m"], metrics["flops_g"], metrics["protocol"]) == (info.params_m, info.flops_g,
                                                                             "finetune")
    curve = metrics["curve"]
    assert [entry["epoch"] for entry in curve] == [1, 2] and metrics["iterations"] == EPOCHS * STEPS
    best = max(curve, key=lambda entry: entry["top1"])
    assert (metrics["top1"], metrics["top5"]) == (best["top1"], best["top5"])
    assert (metrics["final_top1"], metrics["final_top5"]) == (curve[-1]["top1"], curve[-1]["top5"])
    assert curve[-1]["top1"] == max(curve[-1]["model_top1"], curve[-1]["ema0.99_top1"])
    assert curve[-1]["top5"] == 100.0  # 3 classes

    checkpoint = _checkpoint(reference)
    assert checkpoint["stage"] == "cls" and set(checkpoint["ema"]) == {"ema0.99"}
    previous = torch.load(reference / "checkpoint-last.pth.prev", map_location="cpu", weights_only=False)
    assert previous["iteration"] < checkpoint["iteration"]  # the save before the last one is kept as .prev
    ema_state = {k[len("module."):]: v for k, v in checkpoint["ema"]["ema0.99"].items()}
    for name, state in (("model", checkpoint["model"]), ("ema0.99", ema_state)):
        pairs = _val_predictions(data, state, 3)
        assert len(pairs) == 12
        top1 = 100 * sum(p == t for p, t in pairs) / len(pairs)
        assert curve[-1][f"{name}_top1"] == pytest.approx(top1), name

    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/top1" in r]
    assert [r["eval/top1"] for r in evals] == [entry["top1"] for entry in curve]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, EPOCHS * STEPS + 1))
    assert steps[0]["lr"] < steps[STEPS]["lr"]  # warm-up over the first epoch


def test_model_best_holds_the_weights_behind_the_reported_top1(reference, data):
    path = reference / BEST
    best = torch.load(path, map_location="cpu", weights_only=True)
    result = json.loads((reference / "result.json").read_text())
    metrics = result["metrics"]
    assert result["outputs"]["best"] == str(path)
    assert (best["arch"], best["epoch"], best["metric"], best["top5"], best["weights"]) == (
        "resnet18", metrics["best_epoch"], metrics["top1"], metrics["top5"], metrics["best_weights"])
    pairs = _val_predictions(data, best["state_dict"], 3)
    assert 100 * sum(p == t for p, t in pairs) / len(pairs) == pytest.approx(best["metric"])
    model = timm.create_model("resnet18", num_classes=3)
    timm.models.load_checkpoint(model, str(path))  # strict, as timm's train.py --initial-checkpoint
    _assert_same_state(model.state_dict(), best["state_dict"])
    weights = read_weights(path)
    assert (weights.layout, weights.model_name) == ("timm-checkpoint", "resnet18")


class _Trainer:
    """What BestWeightsHook reads of the loop's trainer: the state (epoch, curve) and the rank."""

    def __init__(self) -> None:
        self.state, self.env = types.SimpleNamespace(epoch=0, extra={"curve": []}), DistEnv()

    def evaluated(self, epoch: int, top1: float, weights: str) -> None:
        self.state.epoch = epoch
        self.state.extra["curve"].append({"epoch": epoch, "top1": top1, "top5": 100.0, "weights": weights})


def test_model_best_follows_the_winning_weights_and_only_strictly_better_evaluations(tmp_path):
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    hook = BestWeightsHook(str(tmp_path), "resnet18", lambda: [("model", model), ("ema0.99", ema)], {"seed": 0})
    trainer = _Trainer()

    def saved() -> dict:
        return torch.load(tmp_path / BEST, weights_only=True)

    trainer.evaluated(1, 50.0, "ema0.99")
    hook.after_epoch(trainer)
    assert (saved()["epoch"], saved()["weights"], saved()["args"]) == (1, "ema0.99", {"seed": 0})
    assert torch.equal(saved()["state_dict"]["weight"], ema.weight)  # the EMA that won, not the model
    for epoch, top1 in ((2, 40.0), (3, 50.0)):  # lower, then a tie: the earlier best stays
        trainer.evaluated(epoch, top1, "model")
        hook.after_epoch(trainer)
        assert saved()["epoch"] == 1
    trainer.state.epoch = 4  # an epoch without evaluation
    hook.after_epoch(trainer)
    assert saved()["epoch"] == 1
    trainer.evaluated(5, 60.0, "model")
    hook.after_epoch(trainer)
    assert (saved()["epoch"], saved()["metric"]) == (5, 60.0)
    assert torch.equal(saved()["state_dict"]["weight"], model.weight)


def test_detection_starts_from_model_best(reference, tmp_path, caplog):
    from downstream.det.data import DetDemoSpec, make_det_demo
    from downstream.det.train import run as det_run

    coco = make_det_demo(tmp_path / "coco", DetDemoSpec(2, 1, 64))
    caplog.set_level("INFO")
    outcome = det_run(["--config", "tiny", "--weights", str(reference / BEST), "--out", str(tmp_path / "det"),
                       "--coco-root", str(coco), "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
                       "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
                       "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0"])
    assert outcome.status == "completed"
    loaded = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert str(reference / BEST) in loaded and "timm-checkpoint" in loaded


def test_eval_only_reproduces_the_final_numbers(reference, data, tmp_path):
    out = tmp_path / "eval"
    outcome = run([*FT, "--data", str(data), "--weights", str(reference / "checkpoint-last.pth"), "--out", str(out),
                   "--eval-only"])
    assert outcome.status == "completed"
    result = json.loads((out / "result.json").read_text())
    final = json.loads((reference / "result.json").read_text())["metrics"]["curve"][-1]
    assert result["metrics"]["curve"] == [final]
    assert result["inputs"]["weights"] == str((reference / "checkpoint-last.pth").resolve())
    assert not (out / "checkpoint-last.pth").exists()


def test_linear_probe_trains_the_head_only(data, weights, tmp_path, caplog):
    out = tmp_path / "linear"
    caplog.set_level("INFO")
    outcome = run(_finetune_argv(data, weights, out, "--protocol", "linear", "--epochs", "1", "--warmup-epochs", "0",
                                 "--lr", "0.05"))
    assert outcome.status == "completed"
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["protocol"] == "linear" and result["config"]["preset"] == "tiny"
    trained = _checkpoint(out)["model"]
    saved = torch.load(weights, map_location="cpu", weights_only=True)  # the file's classifier is a fresh one
    pretrained = {k: v for k, v in saved["state_dict"].items() if k not in saved["meta"]["untrained"]}
    _assert_same_state({k: trained[k] for k in pretrained}, pretrained)  # backbone and BN statistics untouched
    assert trained["fc.weight"].shape == (3, 512) and trained["fc.weight"].abs().max() > 0
    assert "linear probe: training fc.weight, fc.bias only" in caplog.text


# --- faults: SIGKILL mid-epoch and stop signals resume exactly


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "downstream.cls", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    """Poll the run's metrics.jsonl (partial lines skipped) until it has logged optimiser step ``step``."""
    deadline = time.monotonic() + 240
    while max((r.get("step", 0) for r in read_metrics(out)), default=0) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "run too slow"
        time.sleep(0.01)


def test_stop_request_saves_returns_stopped_and_resumes_exactly(reference, data, weights, tmp_path):
    """In-process, as a submitit job calls the stage: a stop request (what submitit's SIGUSR2 handler records)
    ends the run after saving its step; --resume auto then ends with the uninterrupted run's weights."""
    stop = StopRequest()
    stop.request("SIGUSR2")
    argv = _finetune_argv(data, weights, tmp_path)
    outcome = run(argv, stop=stop)
    assert (outcome.status, outcome.signal_name, outcome.out) == ("stopped", "SIGUSR2", str(tmp_path))
    assert _checkpoint(tmp_path)["iteration"] == 1 and not (tmp_path / "result.json").exists()
    assert run([*argv, "--resume", "auto"]).status == "completed"
    _assert_resumed_like(tmp_path, reference)


def _assert_resumed_like(out: Path, reference: Path) -> None:
    resumed, uninterrupted = _checkpoint(out), _checkpoint(reference)
    best, reference_best = (torch.load(folder / BEST, weights_only=True) for folder in (out, reference))
    assert (best["epoch"], best["weights"], best["metric"]) == (reference_best["epoch"], reference_best["weights"],
                                                                reference_best["metric"])
    _assert_same_state(best["state_dict"], reference_best["state_dict"])
    _assert_same_state(resumed["model"], uninterrupted["model"])
    _assert_same_state(resumed["ema"]["ema0.99"], uninterrupted["ema"]["ema0.99"])
    expected = json.loads((reference / "result.json").read_text())["metrics"]
    got = json.loads((out / "result.json").read_text())["metrics"]
    assert (got["curve"], got["epoch_losses"]) == (expected["curve"], expected["epoch_losses"])


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_exactly(reference, data, weights, tmp_path, how):
    """SIGKILL: killed and resumed with 2 data workers, against the reference with none (each image's augmentation
    depends on the seed, the epoch and its place in the epoch, not on the worker that drew it)."""
    out = tmp_path / "run"
    workers = ["--workers", "2"] if how == "SIGKILL" else []
    argv = _finetune_argv(data, weights, out, "--save-every", "2", *workers)
    proc = _start(argv)
    _wait_for_step(proc, out, 3)
    os.kill(proc.pid, getattr(signal, how))
    stdout, stderr = proc.communicate(timeout=120)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0, stderr[-2000:]
        assert "stopped by SIGTERM" in stdout and not (out / "result.json").exists()
        assert _checkpoint(out)["iteration"] >= 3  # saved where it stopped
    assert run([*argv, "--resume", "auto"]).status == "completed"
    _assert_resumed_like(out, reference)


def test_two_ranks_with_torchrun_share_the_work(data, weights, tmp_path):
    """Two gloo ranks on the CPU: repeated augmentation, rank-synced BatchNorm, each val image evaluated once."""
    out = tmp_path / "ddp"
    argv = _finetune_argv(data, weights, out, "--batch-size", "2", "--aug-repeats", "3", "--sync-bn")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "downstream.cls"]
    result = subprocess.run([*torchrun, *argv], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BatchNorm layers synchronised over 2 CPU ranks" in result.stderr
    metrics = json.loads((out / "result.json").read_text())
    assert metrics["config"]["world_size"] == 2 and metrics["config"]["grad_accum_steps"] == 1
    assert [entry["images"] for entry in metrics["metrics"]["curve"]] == [12] * EPOCHS
