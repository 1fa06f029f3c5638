"""Guard rails: configs are type-checked frozen values; the paper preset and recipes need --data (only tiny falls
back to the demo set, and says so); a dry run warns about unfilled ${...} and a launch refuses them; tables go to
ROOT/tables; an unreadable result.json is named, not taken for a missing run; ``python -m slurm`` and the console
scripts work."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import textwrap

import pytest
from test_slurm_support import LAUNCHER, REPO, run_tool

from downstream.cls.__main__ import main as cls_main
from pretrain.__main__ import main as pretrain_main
from pretrain.__main__ import run as pretrain_run
from pretrain.config import resolve_config
from pretrain.data import make_demo_dataset
from pretrain.runtime.result import read_result, write_result
from slurm.launcher import main as launch_main
from slurm.launcher import make_plan
from slurm.resources import load_resources
from slurm.state import SweepState
from slurm.sweep import load_sweep, load_sweep_file


def _error(capsys, call, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == code and len(lines) == 1, lines
    return lines[0]


# --- configs are values


def test_configs_are_frozen_and_yaml_values_are_type_checked(tmp_path, capsys):
    cfg = resolve_config("tiny", {"scale": [0.5, 1.0]}, check_model=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert cfg.scale == (0.5, 1.0) and isinstance(cfg.warmup_epochs, float)
    preset = tmp_path / "mine.yaml"
    for text, message in (("epochs: ten", "epochs must be an integer, got 'ten'"),
                          ("lr_base: 2e-4", "lr_base must be a number, got '2e-4'"),  # YAML 1.1: a string
                          ("hierarchy: 'yes'", "hierarchy must be true or false"),
                          ("scale: 0.5", "scale must be a list, got 0.5"),
                          ("per_model:\n  - {match: '*', set: {batch_size: 8.5}}", "batch_size must be an integer")):
        preset.write_text(f"base: tiny\n{text}\n")
        error = _error(capsys, lambda: pretrain_main(["--config", str(preset), "--print-config"]))
        assert error.startswith(f"python -m pretrain: error: preset '{preset}'") and message in error, error


# --- data: only tiny falls back to the demo set


def test_the_paper_preset_and_recipes_need_data(tmp_path, capsys):
    error = _error(capsys, lambda: pretrain_main(["--model", "resnet18", "--out", str(tmp_path / "pt")]))
    assert "--data is required with preset 'paper'" in error and "--preset tiny" in error
    error = _error(capsys, lambda: cls_main(["--config", "table7", "--weights", "none", "--out", str(tmp_path)]))
    assert "--data is required with recipe 'table7'" in error
    assert not any(tmp_path.iterdir()), "nothing is built or written"


def test_tiny_falls_back_to_the_demo_set_and_says_so(tmp_path, monkeypatch, caplog):
    demo = make_demo_dataset(tmp_path / "demo", num_classes=2, train_per_class=4, val_per_class=1, image_size=64)
    monkeypatch.setenv("SPARK_DEMO_DATA", str(demo))
    caplog.set_level("INFO")
    out = tmp_path / "run"
    outcome = pretrain_run(["--config", "tiny", "--input-size", "64", "--decoder-width", "64", "--batch-size", "4",
                            "--global-batch", "4", "--epochs", "1", "--workers", "0", "--no-progress",
                            "--no-tensorboard", "--out", str(out)])
    assert outcome.status == "completed"
    assert f"--data demo (preset tiny): training on the embedded demo set {demo / 'train'}" in caplog.text
    result = read_result(out)
    assert result.inputs["data"] == str(demo / "train") and result.config["data"] == "demo"


# --- the sweep and the tables


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


NEEDS = """
    needs:
      imagenet: ImageNet root
      pretrained: a folder of pretrained weights
    experiments:
      - {name: pt, stage: pretrain, args: "--config tiny --data ${imagenet}/train"}
      - {name: cls, stage: cls, args: "--config tiny --weights ${pretrained}/w.pth --data ${imagenet}"}
"""


def test_a_dry_run_warns_about_unfilled_placeholders_and_a_launch_refuses_them(tmp_path, capsys):
    tool = run_tool(LAUNCHER, "--sweep", "table3", "--dry-run", "--root", str(tmp_path))
    assert tool.returncode == 0 and "10 to submit" in tool.stdout and tool.heavy == []
    warnings = [line for line in tool.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "${imagenet}" in warnings[0] and "pass --imagenet DIR" in warnings[0]
    assert "pass --coco DIR" in warnings[1]
    # each stage job shows its config as resolved on the job's ranks (the stage's own resolution, no torch)
    assert "on 32 cuda rank(s): global batch 4096 = 128 x 32 ranks x 1 accum, peak lr 0.0032" in tool.stdout
    assert "on 8 cuda rank(s): 16 images per iteration = 2 x 8 rank(s)" in tool.stdout
    paper = run_tool(LAUNCHER, "--dry-run", "--root", str(tmp_path), "--imagenet", "/in1k", "--coco", "/coco")
    assert paper.returncode == 0 and paper.heavy == [] and "warning" not in paper.stderr
    stage_jobs = [e for e in load_sweep("paper").experiments.values() if e.stage != "command"]
    resolved = [line for line in paper.stdout.splitlines() if line.startswith("     ")]
    assert len(resolved) == len(stage_jobs) and all(line.strip().startswith("on ") for line in resolved), resolved
    sweep = _write(tmp_path, "needs.yaml", NEEDS)
    assert launch_main(["--sweep", sweep, "--dry-run", "--root", str(tmp_path), "--imagenet", "/in1k"]) == 0
    err = capsys.readouterr().err
    assert "${pretrained} is not filled in: pass --path pretrained=DIR" in err and "imagenet" not in err
    error = _error(capsys, lambda: launch_main(["--sweep", sweep, "--root", str(tmp_path), "--cluster", "debug",
                                               "--imagenet", "/in1k"]))
    assert "experiment cls needs --path pretrained=DIR" in error
    assert not (tmp_path / "sweep-state.json").exists(), "a refused launch submits nothing"


def test_the_tables_go_to_root_tables_by_default(tmp_path):
    root = tmp_path / "runs"
    write_result(str(root / "r50-scratch-cls"), "cls", "resnet50", {"top1": 79.0}, {}, {})
    tool = run_tool("-m", "results", "--root", str(root))
    assert tool.returncode == 0, tool.stderr
    assert (root / "tables" / "table3.md").is_file() and not (REPO / "results" / "table3.md").exists()
    sweep = _write(tmp_path, "one.yaml", """
        experiments:
          - {name: data, stage: command, module: pretrain.data, creates: ["${out}/d/demo.json"],
             args: "make-demo ${out}/d --classes 1 --train-per-class 1 --val-per-class 1 --image-size 32"}
    """)
    launched = run_tool(LAUNCHER, "--cluster", "debug", "--sweep", sweep, "--root", str(tmp_path / "sweep"))
    assert launched.returncode == 0, launched.stderr
    assert (tmp_path / "sweep" / "tables" / "table3.md").is_file()
    assert f"tables: {tmp_path / 'sweep' / 'tables'}" in launched.stdout


def test_an_unreadable_result_is_named_not_taken_for_a_missing_run(tmp_path):
    root = tmp_path / "runs"
    write_result(str(root / "r50-scratch-cls"), "cls", "resnet50", {"top1": 79.0}, {}, {})
    broken = root / "r50-spark-cls" / "result.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"stage": "cls", "model": ')
    tool = run_tool("-m", "results", "--root", str(root), "--out", str(tmp_path / "tables"))
    assert tool.returncode == 1 and (tmp_path / "tables" / "table3.md").is_file()
    lines = tool.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m results: error: cannot read {broken}: "), lines

    sweep = load_sweep_file(_write(tmp_path, "graph.yaml", """
        experiments:
          - {name: r50-spark-cls, stage: cls, args: "--config tiny --weights none"}
          - {name: r50-scratch-cls, stage: cls, args: "--config tiny --weights none"}
    """))
    plan = {s.exp.name: s for s in make_plan(sweep, sweep.select(("cls",)), str(root), {}, load_resources(),
                                             SweepState(str(root)), {})}
    assert (plan["r50-scratch-cls"].action, plan["r50-scratch-cls"].reason) == ("skip", "completed")
    spark = plan["r50-spark-cls"]
    assert spark.action == "skip" and spark.state.state == "unreadable"
    assert f"cannot read {broken}" in spark.reason and "--retry-failed" in spark.reason


def test_python_m_slurm_launches_and_the_stages_are_console_scripts(tmp_path):
    tool = run_tool("-m", "slurm", "--dry-run", "--root", str(tmp_path))
    assert tool.returncode == 0 and "sweep tiny: 13 experiments" in tool.stdout and tool.heavy == []
    names = {"spark-pretrain", "spark-finetune", "spark-detect", "spark-sweep", "spark-results"}
    scripts = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts") if e.name in names}
    assert set(scripts) == names, "installed console scripts (pyproject.toml [project.scripts], make setup)"
    for entry in scripts.values():
        assert callable(entry.load()), entry.value
