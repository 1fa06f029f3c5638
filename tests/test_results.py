"""``python -m results``: the paper's tables and curves from real result.json files written as the stages do."""

from __future__ import annotations

import csv
import json
import os

from test_slurm_support import run_tool

from pretrain.runtime.result import write_result
from results.provenance import run_origins
from results.tables import load_specs, mean_std, row_notes
from slurm.sweep import load_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _cls(root, name, top1, **extra):
    curve = [{"epoch": e, "top1": top1 - 3 + e, "top5": 95.0} for e in range(1, 4)]
    metrics = {"top1": top1, "top5": 95.0, "final_top1": top1 - 0.1, "protocol": "finetune", "curve": curve, **extra}
    write_result(str(root / name), "cls", "resnet50", metrics, {"recipe": "table7"}, {"weights": "none", "data": "x"})


def _runs(root):
    """A partial paper sweep: SparK and supervised ResNet-50 ImageNet runs, one Mask R-CNN, one pretraining run."""
    _cls(root, "r50-spark-cls", 80.1, params_m=25.557, flops_g=4.1095)
    _cls(root, "r50-sup-cls", 79.0)
    det = {"bbox_AP": 40.24, "bbox_AP50": 60.0, "bbox_AP75": 44.0, "segm_AP": 36.01, "segm_AP75": 38.0}
    write_result(str(root / "r50-spark-det-1x"), "det", "resnet50", det, {}, {"weights": "x.pkl", "data": "coco"})
    losses = [1.2, 0.9, 0.7]
    pt = root / "r50-spark-pt"
    write_result(str(pt), "pretrain", "resnet50", {"epoch_losses": losses, "loss_last_epoch": 0.7}, {}, {})
    records = [{"epoch": e, "step": 2 * e + s, "step_in_epoch": s, "loss": 1.3 - 0.1 * (2 * e + s)}
               for e in range(3) for s in (1, 2)]
    (pt / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_result(str(root / "elsewhere" / "nested"), "cls", "resnet18", {"top1": 12.0}, {}, {})  # matches no row


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|  |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_tables_put_this_run_beside_the_paper(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "tables"
    _runs(root)
    tool = run_tool("-m", "results", "--root", str(root), "--out", str(out))
    assert tool.returncode == 0, tool.stderr
    assert tool.heavy == [], "the tables must not import torch or timm"
    assert sorted(os.listdir(out)) == ["finetune_top1.png", "pretrain_loss.png", "table1.csv", "table1.md",
                                       "table3.csv", "table3.md", "table4.csv", "table4.md", "table5.csv", "table5.md"]
    table3 = _rows((out / "table3.md").read_text())
    assert table3["SparK"][:6] == ["80.1 (80.6; -0.5)", "40.2 (41.6; -1.4)", "36.0 (37.7; -1.7)", "– (43.4)",
                                   "– (39.4)", "r50-spark-cls, r50-spark-det-1x"]
    assert table3["Supervised"][:2] == ["79.0 (79.8; -0.8)", "– (38.9)"]
    assert table3["MoCov2 (paper only)"][0] == "– (79.8)" and table3["MoCov2 (paper only)"][5] == "–"
    table4 = _rows((out / "table4.md").read_text())
    assert table4["ResNet-50, 224"][:5] == ["25.6 (25.6; 0.0)", "4.1 (4.1; 0.0)", "79.0 (79.8; -0.8)",
                                            "80.1 (80.6; -0.5)", "+1.1 (+0.8; +0.3)"]
    assert table4["ResNet-101, 224"][3] == "– (82.2)"
    assert _rows((out / "table1.md").read_text())["SparK ConvNeXt-S"][0] == "– (84.1)"
    with open(out / "table3.csv") as handle:
        lines = list(csv.DictReader(handle))
    spark = next(r for r in lines if r["row"] == "SparK" and r["column"] == "Cls. top-1")
    assert (spark["paper"], spark["this_run"], spark["run_folder"]) == ("80.6", "80.1", "r50-spark-cls")
    assert abs(float(spark["difference"]) + 0.5) < 1e-9
    missing = next(r for r in lines if r["row"] == "SparK" and r["column"] == "2x APbb")
    assert (missing["paper"], missing["this_run"], missing["difference"]) == ("43.4", "", "")
    for name in ("pretrain_loss.png", "finetune_top1.png"):
        assert (out / name).read_bytes().startswith(PNG) and (out / name).stat().st_size > 10_000


def test_running_twice_gives_identical_files(tmp_path):
    root = tmp_path / "runs"
    _runs(root)
    for out in ("a", "b"):
        assert run_tool("-m", "results", "--root", str(root), "--out", str(tmp_path / out)).returncode == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_linear_probe_and_tiny_tables_appear_when_their_runs_finish(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "tables"
    _cls(root, "r50-spark-linear", 50.25)
    _cls(root, "tiny-scratch-cls", 40.0)
    _cls(root, "tiny-spark-cls", 55.5)
    write_result(str(root / "tiny-spark-det"), "det", "resnet18", {"bbox_AP": 12.0, "segm_AP": 10.0}, {}, {})
    for seed, top1 in enumerate((50.0, 52.0, 57.0)):  # mean 53.0, sample std sqrt(13) = 3.61
        _cls(root, f"tiny-spark-lin-s{seed}", top1)
    for seed, top1 in enumerate((30.0, 31.0)):  # seed 2 has not finished: two runs, mean 30.5, std 0.71
        _cls(root, f"tiny-scratch-lin-s{seed}", top1)
    tool = run_tool("-m", "results", "--root", str(root), "--out", str(out))
    assert tool.returncode == 0, tool.stderr
    assert _rows((out / "table6.md").read_text())["SparK"][0] == "50.2 (54.7; -4.5)"
    tiny = _rows((out / "tiny.md").read_text())
    assert tiny["random initialisation"][:4] == ["40.0 (n=1)", "30.5 ± 0.7 (n=2)", "–", "–"]
    assert tiny["SparK (tiny pretraining)"][:4] == ["55.5 (n=1)", "53.0 ± 3.6 (n=3)", "12.0 (n=1)", "10.0 (n=1)"]
    assert tiny["Δ SparK - random"][:4] == ["+15.5", "+22.5", "–", "–"]
    assert "tiny-spark-lin-s0, tiny-spark-lin-s1, tiny-spark-lin-s2" in tiny["SparK (tiny pretraining)"][4]
    assert "linear: recipe linear --protocol linear" in tiny["SparK (tiny pretraining)"][5]
    with open(out / "tiny.csv") as handle:
        lines = {(r["row"], r["column"]): r for r in csv.DictReader(handle)}
    probe = lines[("SparK (tiny pretraining)", "Linear probe top-1")]
    assert (probe["this_run"], probe["std"][:6], probe["n"]) == ("53", "3.6055", "3")
    assert lines[("random initialisation", "Fine-tuning top-1")]["std"] == ""
    assert (out / "tiny.png").read_bytes().startswith(PNG)


def test_mean_and_sample_std():
    assert mean_std([]) == (None, None) and mean_std([2.0]) == (2.0, None)
    mean, std = mean_std([50.0, 52.0, 57.0])
    assert mean == 53.0 and abs(std - 13 ** 0.5) < 1e-12


def test_notes_say_every_row_s_starting_weights_and_recipe(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "tables"
    root.mkdir()
    assert run_tool("-m", "results", "--root", str(root), "--out", str(out)).returncode == 0
    table3 = _rows((out / "table3.md").read_text())
    supervised = table3["Supervised"][-1]
    assert "cls: recipe rsb-a2, from random initialisation" in supervised
    assert ("det1x: config mask_rcnn_R_50_FPN_1x, from r50-sup-d2/r50-sup.pkl (python -m downstream.convert "
            "detectron2 r50-sup-cls/model_best.pth, or --path supervised_resnet50=FILE)") in supervised
    assert "cls: recipe table7, from r50-spark-pt/encoder_timm.pth (SparK pretraining, preset paper)" in \
        table3["SparK"][-1]
    table4 = _rows((out / "table4.md").read_text())
    large = table4["ConvNeXt-L, 384"][-1]
    assert "published pretraining README's settings (mask ratio 0.75" in large
    assert "--mask-ratio 0.75 --global-batch 2048 --lr-base 4e-4" in large
    assert "base: recipe convnext-in1k, from random initialisation" in table4["ConvNeXt-B, 224"][-1]
    assert "from cnxb-sup-cls/model_best.pth" in _rows((out / "table1.md").read_text())["Supervised"][-1]
    origins = run_origins()
    for spec in load_specs():  # every run of every row is described by the sweeps, under its source's name
        for row in spec.rows:
            for source, folders in row.runs.items():
                assert all(f in origins for f in folders), (spec.id, row.label)
                assert f"{source}: " in row_notes(row, origins), (spec.id, row.label)


def test_missing_root_is_one_line_error(tmp_path):
    tool = run_tool("-m", "results", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "t"))
    assert tool.returncode == 1 and tool.stderr.strip() == f"python -m results: error: --root {tmp_path / 'nope'}: " \
                                                          "no such folder"


def test_every_table_run_is_an_experiment_of_a_sweep():
    experiments = set(load_sweep("paper").experiments) | set(load_sweep("tiny").experiments)
    stage = {**{n: e.stage for n, e in load_sweep("paper").experiments.items()},
             **{n: e.stage for n, e in load_sweep("tiny").experiments.items()}}
    for spec in load_specs():
        sources = {c.source: c.metric for c in spec.columns if c.source}
        for row in spec.rows:
            for source, runs in row.runs.items():
                for run in runs:
                    assert run in experiments, f"{spec.id} row {row.label!r} names unknown run {run}"
                    expected = "det" if sources[source].startswith(("bbox", "segm")) else "cls"
                    assert stage[run] == expected, f"{spec.id}: {run} is a {stage[run]} run"
