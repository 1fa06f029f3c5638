"""``python -m pretrain --init-weights FILE`` (also ``--weights FILE``): a run that starts at epoch 0 from existing
weights (encoder only or with a SparK decoder, any layout the reader knows), logs what it left at initialisation and
what it dropped, settles ``densify_proj`` from the file, yields to a checkpoint to resume, and refuses bad files in
one line with nothing written.

Files are made from small SparK models (resnet18, convnext_atto at 64 px) the way ``tests/test_weights.py`` makes
them; runs are a single epoch of 4 steps on 16 generated images.
"""

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from test_weights import CONFIGS, SIZE, _perturbed, _published

from pretrain.__main__ import main
from pretrain.checkpoint import encoder_payload
from pretrain.config import resolve_config
from pretrain.data import make_demo_dataset
from pretrain.runner import _build_model
from pretrain.runtime.distributed import DistEnv
from pretrain.spark import build_spark
from pretrain.start_weights import start_weights
from pretrain.weights import WeightsError, load_spark_weights, read_weights
from pretrain.weights.suite import ENCODER_PREFIX

RUN = ["--preset", "tiny", "--input-size", str(SIZE), "--batch-size", "4", "--global-batch", "4", "--workers", "0",
       "--epochs", "1", "--warmup-epochs", "0", "--deterministic", "--no-progress", "--no-tensorboard"]
FROZEN = ["--lr", "1e-12", "--weight-decay", "0", "--weight-decay-end", "0"]  # a step that moves nothing measurable


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_classes=2, train_per_class=8,
                             val_per_class=1, image_size=SIZE)
    return root / "train"


@pytest.fixture(scope="module")
def sparks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: _perturbed(build_spark(name, **config)) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def files(sparks, tmp_path_factory) -> dict[str, Path]:
    """An encoder-only ``encoder_timm.pth`` and a released-style file with decoder of each small model."""
    folder = tmp_path_factory.mktemp("files")
    payloads = {f"spark-style-{name}": _published(spark, name) for name, spark in sparks.items()}
    payloads["encoder-resnet18"] = encoder_payload(sparks["resnet18"].encoder_state_dict(), "resnet18", {})
    for case, payload in payloads.items():
        torch.save(payload, folder / f"{case}.pth")
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, folder / "unknown.pth")
    return {case: folder / f"{case}.pth" for case in [*payloads, "unknown"]}


def _model_argv(name: str) -> list[str]:
    return ["--model", name, "--decoder-width", str(CONFIGS[name]["decoder_width"])]


def _config(name: str, *extra: str):
    return resolve_config("tiny", {"model": name, "input_size": SIZE, "decoder_width": CONFIGS[name]["decoder_width"],
                                   **dict(zip(extra[::2], extra[1::2]))})


def _trained_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Parameters an optimiser moves (BatchNorm running statistics move in a training step whatever the lr)."""
    return [k for k, v in state.items() if v.is_floating_point() and "running_" not in k]


@pytest.mark.parametrize(("name", "case", "proj"), [
    ("resnet18", "encoder-resnet18", "width"),
    ("resnet18", "spark-style-resnet18", "published"),
    ("convnext_atto", "spark-style-convnext_atto", "published"),
])
def test_the_runner_builds_its_model_from_the_file(sparks, files, name, case, proj, caplog):
    cfg = _config(name)
    assert cfg.densify_proj == "auto"
    caplog.set_level(logging.INFO, "pretrain")
    start = start_weights(dataclasses.replace(cfg, init_weights=str(files[case])), None)
    assert start.cfg.densify_proj == proj
    spark, _ = _build_model(start.cfg, DistEnv(), False, start.weights)
    source, built = sparks[name].state_dict(), spark.state_dict()
    encoder = [k for k in built if k.startswith(ENCODER_PREFIX)]
    tail = [k for k in encoder if not torch.equal(built[k], source[k])]
    assert len(encoder) > 20 and all(k.startswith(ENCODER_PREFIX + "head.norm.") for k in tail)  # not in the file
    decoder = [k for k in built if not k.startswith(ENCODER_PREFIX)]
    from_file = case.startswith("spark-style")
    assert all(torch.equal(built[k], source[k]) == from_file for k in decoder if k.endswith(".weight"))
    lines = {r.getMessage().split(":")[1].strip(): r.getMessage() for r in caplog.records
             if r.getMessage().startswith("start weights:")}
    left = len(tail) + (0 if from_file else len(decoder))
    assert f": {left} keys" in lines["left at initialisation"]


def test_a_published_convnext_decoder_fits_only_the_published_projections(sparks, files):
    path = str(files["spark-style-convnext_atto"])
    width = build_spark("convnext_atto", **{**CONFIGS["convnext_atto"], "densify_proj": "width"})
    assert set(width.state_dict()) != set(sparks["convnext_atto"].state_dict())  # the setting matters here
    cfg = _config("convnext_atto", "densify_proj", "width", "init_weights", path)
    with pytest.raises(Exception, match="published densify projections; --densify-proj width"):
        start_weights(cfg, None)
    with pytest.raises(WeightsError, match="6 unexpected"):  # loading it anyway names the decoder keys with no place
        load_spark_weights(width, read_weights(path))


def test_a_run_from_a_spark_style_file_starts_at_epoch_0_and_logs_the_keys(data, sparks, files, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    argv = [*RUN, *FROZEN, *_model_argv("convnext_atto"), "--weights", str(files["spark-style-convnext_atto"]),
            "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    messages = [r.getMessage() for r in caplog.records]
    left = "start weights: left at initialisation: 2 keys (encoder.model.head.norm.weight"  # released ConvNeXts lack it
    assert any(m.startswith(left) for m in messages)
    dropped = next(m for m in messages if m.startswith("start weights: dropped from the file"))
    assert dropped.endswith(": 0 keys")
    config = json.loads((out / "config.json").read_text())
    assert config["densify_proj"] == "published" and config["init_weights"] == str(files["spark-style-convnext_atto"])
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["epochs"] == 1 and result["inputs"]["init_weights"] == config["init_weights"]
    saved = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 4  # epoch 0 to 1: four steps, none skipped by a loaded position
    source = sparks["convnext_atto"].state_dict()
    for key in _trained_keys(saved["model"]):
        if ".head.norm." in key:  # not in the released ConvNeXt files
            continue
        assert torch.allclose(saved["model"][key], source[key], atol=1e-6), key
    assert saved["optimizer"]["state"]  # the fresh optimiser took its four steps


def test_without_init_weights_the_run_starts_from_its_seed(data, sparks, tmp_path):
    """The control of the test above: the same run without the file ends far from its weights."""
    out = tmp_path / "run"
    assert main([*RUN, *FROZEN, *_model_argv("resnet18"), "--data", str(data), "--out", str(out)]) == 0
    saved = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)["model"]
    source = sparks["resnet18"].state_dict()
    assert not any(torch.allclose(saved[k], source[k], atol=1e-6) for k in _trained_keys(saved) if "conv" in k)


def test_a_checkpoint_to_resume_wins_over_the_file(data, files, tmp_path, caplog):
    out = tmp_path / "run"
    init = tmp_path / "start.pth"
    init.write_bytes(files["encoder-resnet18"].read_bytes())
    base = [*RUN, *_model_argv("resnet18"), "--data", str(data), "--out", str(out), "--init-weights", str(init)]
    assert main(base) == 0
    init.unlink()  # resuming must not need it
    caplog.set_level(logging.INFO)
    assert main([*base, "--epochs", "2", "--resume", "auto"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resuming from") and f"--init-weights {init} is not read" in m for m in messages)
    assert json.loads((out / "result.json").read_text())["metrics"]["epochs"] == 2


def test_a_resumed_run_keeps_the_densify_proj_its_config_recorded(tmp_path):
    """The run's own config.json, not the default, settles the decoder a resume rebuilds."""
    (tmp_path / "config.json").write_text(json.dumps({"densify_proj": "published"}))
    start = start_weights(_config("resnet18"), str(tmp_path / "checkpoint-last.pth"))
    assert start.cfg.densify_proj == "published" and start.weights is None


@pytest.mark.parametrize(("case", "model", "message"), [
    ("spark-style-convnext_atto", "resnet18", "holds convnext_atto weights, expected resnet18"),
    ("unknown", "resnet18", "has no known weights layout"),
    ("missing", "resnet18", "not found"),
])
def test_bad_files_are_one_line_and_nothing_is_written(data, files, tmp_path, capsys, case, model, message):
    out = tmp_path / "run"
    path = files.get(case, tmp_path / "missing.pth")
    code = main([*RUN, *_model_argv(model), "--init-weights", str(path), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("python -m pretrain: error:"), err
    assert message in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_a_contradicting_densify_proj_is_a_usage_error(data, files, tmp_path, capsys):
    argv = [*RUN, *_model_argv("convnext_atto"), "--densify-proj", "width", "--init-weights",
            str(files["spark-style-convnext_atto"]), "--data", str(data), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "--densify-proj width has no place for them" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
