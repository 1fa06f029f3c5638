"""``python slurm/launch_all.py --stage cls,det --weights FILE``: one checkpoint through the downstream experiments
of its architecture's table rows (``slurm/sweeps/evaluate.yaml`` with ``--imagenet/--coco``, ``evaluate-tiny.yaml``
on the demo data), planned by the sweep machinery; dry runs for a ResNet-50 and a ConvNeXt checkpoint, the one-line
errors, and the table of the checkpoint beside the paper's SparK row (``results/evaluation.yaml``)."""

import re
from pathlib import Path

import pytest
import timm
import torch

from pretrain.checkpoint import encoder_payload
from pretrain.runtime.result import write_result
from results.evaluation import evaluation_specs
from results.evaluation import main as evaluation_main
from results.tables import collect_runs
from slurm.launcher import main
from slurm.sweep import SweepError, load_sweep

DATA = ["--imagenet", "/data/imagenet", "--coco", "/data/coco"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``encoder_timm.pth`` files of three architectures (the model name comes from the file)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    files = {}
    for name in ("resnet50", "convnext_atto", "resnet18"):
        model = timm.create_model(name, num_classes=0)
        files[name] = folder / f"{name}.pth"
        torch.save(encoder_payload(model.state_dict(), name, {}), files[name])
    return files


def _graph(capsys, *argv: str) -> tuple[dict[str, tuple[str, str]], str]:
    """``{experiment: (stage, after)}`` of a dry run's job graph, and its whole output."""
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.split("\n\n")[1].splitlines()[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[1]] = (cells[2], cells[5])
    return rows, out


def test_a_resnet50_checkpoint_gets_table7_the_linear_probe_and_mask_rcnn_1x_2x(checkpoints, tmp_path, capsys):
    rows, out = _graph(capsys, "--stage", "cls,det", "--weights", str(checkpoints["resnet50"]), *DATA,
                       "--root", str(tmp_path))
    assert rows == {"eval-ft-table7": ("cls", "-"), "eval-linear": ("cls", "-"), "eval-d2": ("command", "-"),
                    "eval-det-1x": ("det", "eval-d2"), "eval-det-2x": ("det", "eval-d2")}
    weights = str(checkpoints["resnet50"])
    assert f"--recipe table7 --model resnet50 --weights {weights}" in out
    assert f"--recipe linear --protocol linear --model resnet50 --weights {weights}" in out
    assert f"detectron2 --model resnet50 {weights} {tmp_path}/eval-d2/backbone.pkl" in out
    assert f"--config mask_rcnn_R_50_FPN_2x --weights {tmp_path}/eval-d2/backbone.pkl --coco-root /data/coco" in out
    assert "sweep evaluate:" in out and "${" not in out


def test_a_convnext_checkpoint_gets_table8_the_linear_probe_and_mask_rcnn_3x(checkpoints, tmp_path, capsys):
    rows, out = _graph(capsys, "--stage", "cls,det", "--weights", str(checkpoints["convnext_atto"]), *DATA,
                       "--root", str(tmp_path))
    assert rows == {"eval-ft-table8": ("cls", "-"), "eval-linear": ("cls", "-"), "eval-det-3x": ("det", "-")}
    assert "--recipe table8 --model convnext_atto" in out
    assert "--config mask_rcnn_convnext_base_FPN_3x" in out and out.rstrip().endswith("0 blocked")
    assert "MODEL.TIMM.NAME convnext_atto" in out


def test_without_data_paths_the_demo_template_runs_and_stage_selects(checkpoints, tmp_path, capsys):
    rows, out = _graph(capsys, "--stage", "det", "--weights", str(checkpoints["resnet18"]), "--root", str(tmp_path))
    assert rows == {"demo-coco": ("command", "-"), "demo-det": ("det", "demo-coco")}  # its data step comes along
    assert "sweep evaluate-tiny:" in out and "--config tiny" in out and "MODEL.TIMM.NAME resnet18" in out
    rows, _ = _graph(capsys, "--stage", "cls", "--weights", str(checkpoints["resnet18"]), "--model", "resnet18",
                     "--root", str(tmp_path))
    assert rows == {"demo-images": ("command", "-"), "demo-ft": ("cls", "demo-images"),
                    "demo-linear": ("cls", "demo-images")}


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--stage", "cls,dt", "--weights", "W"], 2, "unknown stage(s) 'dt'"),
    (["--stage", "cls", "--weights", "missing.pth"], 1, "--weights file not found: missing.pth"),
    (["--stage", "cls", "--model", "resnet50"], 2, "--model names the architecture of --weights FILE"),
    (["--stage", "cls", "--weights", "W", "--model", "efficientnet_b0"], 2,
     "has no experiment for architecture efficientnet_b0"),
    (["--stage", "pretrain", "--weights", "W"], 2, "has no experiment of stage(s) pretrain"),
])
def test_bad_input_is_one_line(checkpoints, tmp_path, capsys, argv, code, message):
    argv = [str(checkpoints["resnet18"]) if a == "W" else a for a in argv]
    try:
        got = main([*argv, "--root", str(tmp_path), "--dry-run"])
    except SystemExit as exit_info:  # usage errors exit at once, as argparse does
        got = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code and len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_an_experiment_needing_one_that_does_not_apply_is_refused(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("experiments:\n"
                    "  - {name: a, stage: command, module: m, models: ['resnet*']}\n"
                    "  - {name: b, stage: cls, args: '--weights ${run:a}/x', models: ['convnext*', 'resnet*']}\n")
    assert set(load_sweep(str(path)).for_model("resnet50").experiments) == {"a", "b"}
    with pytest.raises(SweepError, match="b applies to convnext_small but needs a"):
        load_sweep(str(path)).for_model("convnext_small")


def _finished(root: Path, name: str, stage: str, model: str, **metrics: float) -> None:
    write_result(str(root / name), stage, model, metrics, {}, {"weights": "x.pth", "data": "d"})


def test_the_table_puts_the_checkpoint_beside_the_papers_row_of_its_architecture(tmp_path):
    _finished(tmp_path, "eval-ft-table7", "cls", "resnet50", top1=80.1)
    _finished(tmp_path, "eval-det-2x", "det", "resnet50", bbox_AP=43.0, segm_AP=39.0)
    written = evaluation_main(["--root", str(tmp_path), "--model", "resnet50"])
    assert written == 0
    table = (tmp_path / "tables" / "evaluation.md").read_text()
    assert "paper's SparK ResNet-50" in table and "ConvNeXt" not in table and "demo" not in table
    row = next(line for line in table.splitlines() if line.startswith("| SparK ResNet-50"))
    assert "| 80.1 (80.6; -0.5) | – (54.7) | – (41.6) | – (37.7) | 43.0 (43.4; -0.4) | 39.0 (39.4; -0.4) |" in row
    assert not (tmp_path / "tables" / "table3.md").exists()  # only this checkpoint's table

    _finished(tmp_path, "demo-ft", "cls", "resnet50", top1=40.0)  # a demo run under the same root
    specs = evaluation_specs("convnext_base", collect_runs(tmp_path))
    assert [s.id for s in specs] == ["evaluation-convnext-base", "evaluation-demo"]
    assert [s.id for s in evaluation_specs("resnet18", {})] == ["evaluation-resnet"]  # no paper row: no numbers


def test_an_architecture_without_a_table_is_one_line(tmp_path, capsys):
    assert evaluation_main(["--root", str(tmp_path), "--model", "vit_tiny"]) == 1
    assert "has no table for architecture vit_tiny" in capsys.readouterr().err
