"""``python -m downstream.convert``: the timm converter (resnet50, convnext_small), the Detectron2 converter
(318 tensors, each checked by value against a mapping written here from Detectron2's side, and loaded into the
table-9 model), and their one-line errors.

The weights are timm's initialisation with every tensor made distinct: fresh timm weights have all 265 BatchNorm
tensors of a ResNet-50 constant (weights 1 or 0, biases and running means 0, running variances 1), under which a
converter that swaps two BatchNorms of a block cannot be told from a correct one."""

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from downstream.convert.__main__ import main
from downstream.convert.to_detectron2 import AUTHOR, convert_to_detectron2, rename_resnet
from downstream.convert.to_timm import ConvertError, LoadReport, load_timm_weights, read_timm_weights
from downstream.det.config import adapt_to_run, load_config
from downstream.det.weights import load_detection_weights
from pretrain.checkpoint import encoder_payload

REPO = Path(__file__).resolve().parents[1]


def distinct_state(name: str) -> dict[str, torch.Tensor]:
    """timm's ``num_classes=0`` state dict of ``name`` with noise on every float tensor (running variances kept
    positive) and a different ``num_batches_tracked`` in every BatchNorm: no two tensors of a shape are equal."""
    torch.manual_seed(0)
    state = timm.create_model(name, num_classes=0).state_dict()
    generator = torch.Generator().manual_seed(1)
    for index, (key, value) in enumerate(state.items()):
        if not value.is_floating_point():
            state[key] = torch.full_like(value, 1000 + index)
        elif key.endswith("running_var"):
            state[key] = value * torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = value + torch.randn(value.shape, generator=generator) * 0.1
    return state


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """``encoder_timm.pth`` files (the pretraining runner's format) of resnet50 and convnext_small."""
    folder = tmp_path_factory.mktemp("encoders")
    paths = {}
    for name in ("resnet50", "convnext_small"):
        paths[name] = folder / f"{name}.pth"
        torch.save(encoder_payload(distinct_state(name), name, {"method": "test"}), paths[name])
    return paths


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name", ["resnet50", "convnext_small"])
def test_timm_conversion_loads_with_only_the_classifier_missing(encoders, tmp_path, name, capsys):
    dst = tmp_path / "converted.pth"
    assert main(["timm", str(encoders[name]), str(dst)]) == 0
    assert f"of timm {name}" in capsys.readouterr().out
    saved = torch.load(dst, weights_only=True)
    assert saved["model_name"] == name and saved["meta"]["converted_from"] == str(encoders[name])
    classifier = timm.create_model(name, num_classes=7)
    trained = {k: v for k, v in saved["state_dict"].items() if k not in saved["meta"]["untrained"]}
    result = classifier.load_state_dict(trained, strict=False)
    head = {"resnet50": ["fc.weight", "fc.bias"], "convnext_small": ["head.fc.weight", "head.fc.bias"]}[name]
    assert sorted(result.missing_keys) == sorted(head) and not result.unexpected_keys
    report = load_timm_weights(timm.create_model(name, num_classes=7), dst)
    assert isinstance(report, LoadReport) and sorted(report.missing) == sorted(head) and report.model_name == name
    source = torch.load(encoders[name], weights_only=True)
    assert all(torch.equal(classifier.state_dict()[k], v) for k, v in source["state_dict"].items()
               if k not in source["meta"]["untrained"])


def test_timm_conversion_of_a_pretraining_checkpoint_and_a_classifier_state_dict(tmp_path, capsys):
    from pretrain.checkpoint import ENCODER_PREFIX

    encoder = timm.create_model("resnet18", num_classes=0).state_dict()
    spark_like = {"model": {ENCODER_PREFIX + k: v for k, v in encoder.items()} | {"decoder.w": torch.zeros(2)},
                  "config": {"model": "resnet18"}, "epoch": 3}
    torch.save(spark_like, tmp_path / "checkpoint-last.pth")
    weights = read_timm_weights(tmp_path / "checkpoint-last.pth")
    assert weights.model_name == "resnet18" and weights.state_dict.keys() == encoder.keys()
    torch.save(timm.create_model("resnet18", num_classes=5).state_dict(), tmp_path / "plain.pth")
    assert main(["timm", str(tmp_path / "plain.pth"), str(tmp_path / "out.pth"), "--model", "resnet18"]) == 0
    saved = torch.load(tmp_path / "out.pth", weights_only=True)
    assert saved["meta"]["dropped_classifier_keys"] == ["fc.bias", "fc.weight"]
    assert main(["detectron2", str(tmp_path / "plain.pth"), str(tmp_path / "out.pkl"), "--model", "resnet18"]) == 0
    assert "left out the classifier (fc.weight, fc.bias)" in capsys.readouterr().out


def test_load_into_a_timm_classifier_refuses_another_architecture(encoders):
    with pytest.raises(ConvertError, match="holds resnet50 weights; the model is resnet18"):
        load_timm_weights(timm.create_model("resnet18", num_classes=3), encoders["resnet50"])


@pytest.mark.parametrize("case, expected", [
    ("other-architecture", "holds resnet50 weights, expected convnext_small"),
    ("wrong-keys", "does not fit timm resnet18: "),
    ("truncated", "cannot read checkpoint"),
    ("not-a-checkpoint", "cannot read checkpoint"),
    ("missing", "checkpoint not found"),
    ("no-name", "names no architecture: pass --model NAME"),
])
def test_bad_sources_are_one_line_errors(encoders, tmp_path, capsys, case, expected):
    src, extra = encoders["resnet50"], []
    if case == "other-architecture":
        extra = ["--model", "convnext_small"]
    elif case == "wrong-keys":
        src, extra = tmp_path / "plain50.pth", ["--model", "resnet18"]
        torch.save(torch.load(encoders["resnet50"], weights_only=True)["state_dict"], src)
    elif case == "truncated":
        src = tmp_path / "truncated.pth"
        src.write_bytes(encoders["resnet50"].read_bytes()[:100_000])
    elif case == "not-a-checkpoint":
        src = tmp_path / "notes.txt"
        src.write_text("not weights\n")
    elif case == "missing":
        src = tmp_path / "absent.pth"
    elif case == "no-name":
        src = tmp_path / "plain.pth"
        torch.save(timm.create_model("resnet34").state_dict(), src)  # not one of the suite's architectures
    assert main(["timm", str(src), str(tmp_path / "dst.pth"), *extra]) == 1
    line = _error_line(capsys)
    assert expected in line
    if case == "wrong-keys":
        assert "layer1.0.conv3.weight" in line or "unexpected" in line  # names the mismatching keys
    assert not (tmp_path / "dst.pth").exists()


def test_existing_destination_is_kept(encoders, tmp_path, capsys):
    dst = tmp_path / "dst.pth"
    dst.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:  # usage errors exit 2 like argparse's
        main(["timm", str(encoders["resnet50"]), str(dst)])
    assert exit_info.value.code == 2
    assert "add --force" in _error_line(capsys) and dst.read_text() == "keep me"


@pytest.fixture(scope="module")
def r50_pickle(encoders, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("d2") / "r50.pkl"
    convert_to_detectron2(encoders["resnet50"], dst)
    return dst


@pytest.fixture(scope="module")
def table9_model() -> torch.nn.Module:
    """Detectron2's Mask R-CNN of the table-9 config (R-50, BN on one CPU process), freshly initialised."""
    from detectron2.modeling import build_model  # after downstream.det: its shims come first

    cfg = load_config("mask_rcnn_R_50_FPN_1x")
    adapt_to_run(cfg, 1, "cpu")
    return build_model(cfg)


BOTTOM_UP = "backbone.bottom_up."


def timm_resnet_key(d2_key: str) -> str:
    """The timm ResNet key a Detectron2 ResNet key holds, written from Detectron2's naming (not the converter's
    rules): ``stem.conv1`` is timm's ``conv1``/``bn1``; ``res{s}.{b}.conv{i}`` is ``layer{s-1}.{b}.conv{i}``/``bn{i}``;
    ``res{s}.{b}.shortcut`` is ``layer{s-1}.{b}.downsample.0``/``.1``; ``.norm.<p>`` are the BatchNorm's tensors."""
    parts = d2_key.split(".")
    norm = parts[-2] == "norm"
    if parts[0] == "stem":
        return f"bn1.{parts[-1]}" if norm else "conv1.weight"
    stage, block, layer = int(parts[0].removeprefix("res")), parts[1], parts[2]
    prefix = f"layer{stage - 1}.{block}."
    if layer == "shortcut":
        return prefix + (f"downsample.1.{parts[-1]}" if norm else "downsample.0.weight")
    number = layer.removeprefix("conv")
    return prefix + (f"bn{number}.{parts[-1]}" if norm else f"conv{number}.weight")


def check_detectron2_conversion(pickle_path: Path, source: dict[str, torch.Tensor], d2_keys: set[str]) -> None:
    """The pickle holds exactly ``d2_keys`` (the keys of Detectron2's own ResNet), each with the value of the timm
    tensor that :func:`timm_resnet_key` names."""
    with open(pickle_path, "rb") as handle:
        data = pickle.load(handle)
    assert data["model"].keys() == d2_keys
    wrong = [k for k, v in data["model"].items() if not np.array_equal(v, source[timm_resnet_key(k)].numpy())]
    assert not wrong, f"{len(wrong)} of {len(d2_keys)} tensors hold another tensor's values, e.g. {wrong[:4]}"


def test_detectron2_pickle_holds_each_of_the_318_resnet50_tensors_by_value(r50_pickle, encoders, table9_model):
    with open(r50_pickle, "rb") as handle:
        data = pickle.load(handle)
    assert data["__author__"] == AUTHOR and data["matching_heuristics"] is True
    d2_keys = {k.removeprefix(BOTTOM_UP) for k in table9_model.state_dict() if k.startswith(BOTTOM_UP)}
    assert len(d2_keys) == 318 and sum(k.endswith("num_batches_tracked") for k in d2_keys) == 53
    source = torch.load(encoders["resnet50"], weights_only=True)["state_dict"]
    check_detectron2_conversion(r50_pickle, source, d2_keys)


def test_table9_model_loads_the_pickle_with_every_backbone_tensor_in_place(r50_pickle, encoders, table9_model):
    from detectron2.checkpoint import DetectionCheckpointer

    model = copy.deepcopy(table9_model)
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(r50_pickle)))
    assert not [k for k in incompatible.missing_keys if k.startswith(BOTTOM_UP)]
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    source = torch.load(encoders["resnet50"], weights_only=True)["state_dict"]
    loaded = {k.removeprefix(BOTTOM_UP): v for k, v in model.state_dict().items() if k.startswith(BOTTOM_UP)}
    assert len(loaded) == 318
    assert all(torch.equal(v, source[timm_resnet_key(k)]) for k, v in loaded.items())
    fresh = copy.deepcopy(table9_model)
    report = load_detection_weights(fresh, str(encoders["resnet50"]))  # SparK file straight into the trainer
    assert report.loaded == 318 and not [k for k in report.missing if k.startswith(BOTTOM_UP)]
    assert all(torch.equal(v, loaded[k.removeprefix(BOTTOM_UP)]) for k, v in fresh.state_dict().items()
               if k.startswith(BOTTOM_UP))


def test_unmappable_key_is_an_error_not_dropped(encoders, tmp_path, capsys):
    state = torch.load(encoders["resnet50"], weights_only=True)["state_dict"]
    with pytest.raises(ConvertError, match=r"1 keys have no Detectron2 ResNet name \(layer2.0.se.fc1.weight\)"):
        rename_resnet({**state, "layer2.0.se.fc1.weight": torch.zeros(1)})
    assert main(["detectron2", str(encoders["convnext_small"]), str(tmp_path / "cs.pkl")]) == 1
    assert "keys have no Detectron2 ResNet name" in _error_line(capsys)
    assert not (tmp_path / "cs.pkl").exists()


def test_detectron2_target_must_be_a_pkl_and_a_standard_resnet(encoders, tmp_path, capsys):
    assert main(["detectron2", str(encoders["resnet50"]), str(tmp_path / "r50.pth")]) == 1
    assert "Detectron2 reads converted weights from a .pkl file" in _error_line(capsys)
    resnet26 = tmp_path / "resnet26.pth"  # bottleneck blocks 2-2-2-2: every key maps, the depth is not Detectron2's
    torch.save(encoder_payload(timm.create_model("resnet26", num_classes=0).state_dict(), "resnet26", {}), resnet26)
    assert main(["detectron2", str(resnet26), str(tmp_path / "r26.pkl")]) == 1
    assert "resnet26 is not a standard ResNet-18/34/50/101/152" in _error_line(capsys)
    assert not list(tmp_path.glob("*.pkl")) and not (tmp_path / "r50.pth").exists()


@pytest.mark.parametrize("target, name", [("timm", "out.pth"), ("detectron2", "out.pkl")])
def test_force_replaces_an_existing_destination(encoders, tmp_path, target, name):
    dst = tmp_path / name
    dst.write_text("old")
    assert main([target, str(encoders["resnet50"]), str(dst), "--force"]) == 0
    if target == "timm":
        assert torch.load(dst, weights_only=True)["model_name"] == "resnet50"
    else:
        with open(dst, "rb") as handle:
            assert len(pickle.load(handle)["model"]) == 318
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # replaced in place, no temporary left


def test_command_line_help_and_usage_error():
    done = subprocess.run([sys.executable, "-m", "downstream.convert", "detectron2", "--help"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "318 tensors" in done.stdout
    done = subprocess.run([sys.executable, "-m", "downstream.convert", "onnx", "a", "b"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
