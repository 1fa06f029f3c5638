"""The stage contract is one for all three stages: the same ``--resume`` forms, ``--print-config`` for the ranks a
job will have, stop signals (a bad name refused before anything is built; a stop that saves and ends the run,
which a bare ``--resume`` finishes), and ``--help`` showing the values a model gets.

Tiny real runs: resnet18 at 64 px on 8 generated images (pretraining, fine-tuning: 2 steps) and Mask R-CNN on a
4-image COCO-layout set (2 iterations).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from downstream.det.data import DetDemoSpec, make_det_demo
from pretrain.config import resolve_config
from pretrain.data import make_demo_dataset
from pretrain.runtime.config import ConfigError
from pretrain.runtime.result import read_result
from pretrain.runtime.signals import StopRequest

MODULES = {"pretrain": "pretrain.__main__", "cls": "downstream.cls.__main__", "det": "downstream.det.train"}
QUIET = ["--no-progress", "--no-tensorboard", "--workers", "0"]
DET_64PX = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
            "SOLVER.WARMUP_ITERS", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    images = make_demo_dataset(root / "images", num_classes=2, train_per_class=4, val_per_class=2, image_size=64)
    return {"images": images, "coco": make_det_demo(root / "coco", DetDemoSpec(4, 2, 64))}


def _argv(stage: str, inputs: dict[str, Path], out: Path) -> list[str]:
    if stage == "pretrain":
        return ["--config", "tiny", "--input-size", "64", "--decoder-width", "64", "--batch-size", "4",
                "--global-batch", "4", "--epochs", "1", *QUIET, "--data", str(inputs["images"] / "train"), "--out",
                str(out)]
    if stage == "cls":
        return ["--config", "tiny", "--input-size", "64", "--batch-size", "4", "--global-batch", "4", "--epochs", "1",
                "--warmup-epochs", "0", *QUIET, "--weights", "none", "--data", str(inputs["images"]), "--out",
                str(out)]
    return ["--config", "tiny", *DET_64PX, "--weights", "none", "--coco-root", str(inputs["coco"]), "--out", str(out)]


@pytest.mark.parametrize("stage", sorted(MODULES))
def test_every_stage_keeps_the_same_contract(stage, inputs, tmp_path, capsys):
    command = importlib.import_module(MODULES[stage]).COMMAND
    out = tmp_path / "run"
    argv = _argv(stage, inputs, out)

    # --resume: bare (auto), auto, or a path; the sweep asks the stage how to resume and where its checkpoints are
    elsewhere = str(tmp_path / "elsewhere.pth")
    for form, expected in ((["--resume"], "auto"), (["--resume", "auto"], "auto"), (["--resume", elsewhere],
                                                                                      elsewhere)):
        assert command.parse([*argv, *form])[0].resume == expected, form
    assert command.resume_argv == ("--resume", "auto")
    assert command.checkpoint_files == ("checkpoint-last.pth", "checkpoint-last.pth.prev")

    # --print-config as the job will run: 2 GPU ranks, the precision chosen there printed beside the config
    ranks = {"pretrain": ["--batch-size", "2"], "cls": ["--batch-size", "2", "--sync-bn"], "det": []}[stage]
    assert command.run([*argv, *ranks, "--print-config", "--world-size", "2", "--device", "cuda"]).status == "printed"
    printed = json.loads(capsys.readouterr().out)
    assert printed["world_size"] == 2 and printed["precision"]["device_type"] == "cuda"
    if stage == "det":  # Detectron2's config as 2 GPU ranks run it
        assert (printed["detectron2"]["MODEL"]["DEVICE"], printed["detectron2"]["SOLVER"]["IMS_PER_BATCH"]) == \
            ("cuda", 2)
    else:
        assert (printed["global_batch"], printed["grad_accum_steps"], printed["synced_batchnorm"]) == (4, 1, True)

    # a bad stop signal: one line, exit 2, before anything is built
    with pytest.raises(SystemExit) as exit_info:
        command.main([*argv, "--stop-signals", "SIGTERM", "SIGFOO"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "unknown signal 'SIGFOO'" in err[0], err
    assert not out.exists()

    # a stop request (what a stop signal records) saves and ends the run; OUT then needs --resume, which finishes it
    stop = StopRequest()
    stop.request("SIGUSR2")
    stopped = command.run(argv, stop=stop)
    assert (stopped.status, stopped.signal_name, stopped.out) == ("stopped", "SIGUSR2", str(out))
    assert "--resume auto" in stopped.message and (out / "checkpoint-last.pth").is_file()
    assert not (out / "result.json").exists()
    with pytest.raises(ConfigError, match="already holds .*checkpoint-last.pth; pass --resume"):
        command.run(argv)
    assert command.run([*argv, "--resume"]).status == "completed"
    result = read_result(out)
    assert result.stage == stage and result.config["precision"]["device_type"] == "cpu"
    assert result.config["preset"] == "tiny" and "precision" not in command.parse(argv)[0].to_dict()


def _help(module: str, *argv: str) -> str:
    text = importlib.import_module(module).build_parser(list(argv)).format_help()
    return " ".join(text.split())


def _hint(text: str, flag: str) -> str:
    """The ``[preset: value; ...]`` hint at the end of ``flag``'s help."""
    rest = text.split(f" {flag} ", 1)[1]
    return rest.split("]", 1)[0].rsplit("[", 1)[1]


def test_help_shows_the_values_each_preset_gives_the_model():
    pretrain = _help("pretrain.__main__")
    assert _hint(pretrain, "--beta2 BETA2") == "paper: 0.95; tiny: 0.95"  # ResNets (per_model), not the 0.999 base
    assert _hint(pretrain, "--drop-path DROP_PATH") == "paper: 0.05; tiny: 0.0"  # resnet50's, tiny's own
    convnext = _help("pretrain.__main__", "--model", "convnext_small")
    assert _hint(convnext, "--beta2 BETA2") == "paper: 0.999; tiny: 0.999"
    resolved = [resolve_config(p, {"model": "convnext_small"}, check_model=False).drop_path for p in ("paper", "tiny")]
    assert _hint(convnext, "--drop-path DROP_PATH") == "paper: {}; tiny: {}".format(*resolved)
    assert resolved == [0.2, 0.2]  # the paper's per-model entry reaches tiny too (base: paper), as a run resolves it
    hires = _help("downstream.cls.__main__", "--recipe", "table8-code-384")
    assert _hint(hires, "--lr-base LR_BASE") == "table8-code-384: 0.00024"
    assert _hint(hires, "--lr-base-size LR_BASE_SIZE") == "table8-code-384: 1024"
    assert _hint(hires, "--drop-path DROP_PATH") == "table8-code-384: 0.5"
    everything = _help("downstream.cls.__main__", "--model", "resnet101")
    assert "table7: 0.2;" in _hint(everything, "--drop-path DROP_PATH")
