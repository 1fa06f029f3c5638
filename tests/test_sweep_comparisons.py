"""The paper's comparisons in the sweeps (issue 18): supervised baselines with their own recipes, COCO "supervised"
rows from those runs' model_best.pth through the converter (or the user's file), ConvNeXt-L 384 pretraining with
the published README's settings, sweep needs with defaults, seeds, and the tiny sweep's linear probes. No cluster:
dry runs and plans only."""

from __future__ import annotations

import textwrap

import pytest

from slurm.launcher import main as launch_main
from slurm.launcher import make_plan
from slurm.require import main as require_main
from slurm.resources import load_resources
from slurm.state import SweepState
from slurm.sweep import SweepError, load_sweep, load_sweep_file, resolve_args

BASELINES = {"r50-sup-cls": ("rsb-a2", "resnet50", 0.05), "r101-sup-cls": ("rsb-a2", "resnet101", 0.05),
             "r152-sup-cls": ("rsb-a2", "resnet152", 0.05), "r200-sup-cls": ("rsb-a2", "resnet200", 0.05),
             "cnxs-sup-cls": ("convnext-in1k", "convnext_small", 0.4),
             "cnxb-sup-cls": ("convnext-in1k", "convnext_base", 0.5),
             "cnxl-sup-cls": ("convnext-in1k", "convnext_large", 0.5)}


def _parse(stage: str, exp, root, values=None):
    module = {"pretrain": "pretrain.__main__", "cls": "downstream.cls.__main__"}[stage]
    command = pytest.importorskip(module).COMMAND
    argv = ["--out", str(root / exp.name), *resolve_args(exp, exp.args, str(root), values or {"imagenet": "/in1k"})]
    return command.parse(argv)[0]


def _graph(text: str) -> dict[str, str]:
    """Experiment -> its line of a dry run's job graph."""
    lines = text.split("commands:")[0].splitlines()
    return {line.split()[1]: line for line in lines if line[:3].strip().isdigit()}


def test_baselines_train_from_scratch_with_their_own_recipes(tmp_path):
    sweep = load_sweep("paper")
    for name, (recipe, model, drop_path) in BASELINES.items():
        exp = sweep.experiments[name]
        assert exp.args[exp.args.index("--recipe") + 1] == recipe, name
        cfg = _parse("cls", exp, tmp_path)
        assert (cfg.model, cfg.weights, cfg.epochs, cfg.drop_path) == (model, "none", 300, drop_path), name
    assert not [n for n in sweep.experiments if "scratch" in n], "every baseline is a supervised-recipe run"


def test_dry_run_shows_the_coco_supervised_rows_waiting_for_the_baselines_through_the_converter(tmp_path, capsys):
    assert launch_main(["--sweep", "paper", "--dry-run", "--root", str(tmp_path), "--imagenet", "/in1k",
                        "--coco", "/coco"]) == 0
    out = capsys.readouterr().out
    graph = _graph(out)
    after = {name: line.split("submit", 1)[1] for name, line in graph.items()}
    assert "r50-sup-cls" in after["r50-sup-weights"] and "r50-sup-weights" in after["r50-sup-d2"]
    assert "r50-sup-d2" in after["r50-sup-det-1x"] and "r50-sup-d2" in after["r50-sup-det-2x"]
    assert "cnxb-sup-cls" in after["cnxb-sup-weights"] and "cnxb-sup-weights" in after["cnxb-sup-det-3x"]
    # the same converter step as SparK's encoder, on the baseline's best checkpoint
    assert f"python -m downstream.convert detectron2 {tmp_path}/r50-spark-pt/encoder_timm.pth " in out
    assert (f"python -m downstream.convert detectron2 {tmp_path}/r50-sup-cls/model_best.pth "
            f"{tmp_path}/r50-sup-d2/r50-sup.pkl") in out
    assert f"--weights {tmp_path}/r50-sup-d2/r50-sup.pkl --coco-root /coco" in out
    assert f"--config mask_rcnn_convnext_base_FPN_3x --weights {tmp_path}/cnxb-sup-cls/model_best.pth" in out
    assert f"--out {tmp_path}/r50-sup-cls --data /in1k --recipe rsb-a2 --model resnet50 --weights none" in out
    assert f"--out {tmp_path}/cnxl-sup-cls --data /in1k --recipe convnext-in1k --model convnext_large" in out
    assert "cannot resolve" not in out and "rejected" not in out


def test_the_user_s_supervised_weights_replace_the_baseline_run(tmp_path):
    sweep, root = load_sweep("paper"), tmp_path / "runs"
    mine = tmp_path / "resnet50_a2.pth"
    mine.write_bytes(b"weights")

    def plan(values):
        steps = make_plan(sweep, sweep.select(("det",), ("r50-sup-*",)), str(root), {"coco": "/coco", **values},
                          load_resources(), SweepState(str(root)), {})
        return {s.exp.name: s for s in steps}

    given = plan({"supervised_resnet50": str(mine)})
    assert (given["r50-sup-weights"].action, given["r50-sup-weights"].reason) == ("skip", "completed")
    assert (given["r50-sup-d2"].action, given["r50-sup-d2"].parents) == ("submit", ())
    assert given["r50-sup-d2"].spec.argv == ("detectron2", str(mine), str(root / "r50-sup-d2" / "r50-sup.pkl"))
    assert (given["r50-sup-det-1x"].action, given["r50-sup-det-1x"].parents) == ("submit", ("r50-sup-d2",))
    default = plan({})
    assert default["r50-sup-weights"].action == "blocked" and "r50-sup-cls" in default["r50-sup-weights"].reason
    assert default["r50-sup-d2"].spec.argv[1] == str(root / "r50-sup-cls" / "model_best.pth")
    assert default["r50-sup-det-1x"].action == "blocked"
    wrong = plan({"supervised_resnet50": str(tmp_path / "nope.pth")})
    assert wrong["r50-sup-weights"].action == "blocked", "a missing file is not taken for finished weights"


def test_the_user_s_supervised_convnext_replaces_its_baseline_run(tmp_path):
    """ConvNeXt's supervised COCO row needs no conversion: with the user's file, detection waits for nothing."""
    sweep, root = load_sweep("paper"), tmp_path / "runs"
    mine = tmp_path / "convnext_base_in1k.pth"
    mine.write_bytes(b"weights")
    steps = make_plan(sweep, sweep.select(("det",), ("cnxb-sup-*",)), str(root),
                      {"coco": "/coco", "supervised_convnext_base": str(mine)}, load_resources(),
                      SweepState(str(root)), {})
    given = {s.exp.name: s for s in steps}
    assert (given["cnxb-sup-weights"].action, given["cnxb-sup-weights"].reason) == ("skip", "completed")
    assert (given["cnxb-sup-det-3x"].action, given["cnxb-sup-det-3x"].parents) == ("submit", ())
    assert str(mine) in given["cnxb-sup-det-3x"].spec.argv


def test_convnext_large_384_pretrains_with_the_published_readme_settings(tmp_path):
    exp = load_sweep("paper").experiments["cnxl384-spark-pt"]
    cfg = _parse("pretrain", exp, tmp_path)
    assert (cfg.input_size, cfg.mask_ratio, cfg.global_batch, cfg.lr_base) == (384, 0.75, 2048, 4e-4)
    assert "published README" in exp.note
    paper = _parse("pretrain", load_sweep("paper").experiments["cnxl-spark-pt"], tmp_path)
    assert (paper.mask_ratio, paper.global_batch, paper.lr_base) == (0.6, 4096, 2e-4)


def test_tiny_sweep_probes_both_arms_over_three_seeds(tmp_path):
    sweep = load_sweep("tiny")
    for arm, weights in (("spark", str(tmp_path / "tiny-pretrain" / "encoder_timm.pth")), ("scratch", "none")):
        for seed in range(3):
            cfg = _parse("cls", sweep.experiments[f"tiny-{arm}-lin-s{seed}"], tmp_path)
            assert (cfg.protocol, cfg.seed, cfg.weights, cfg.model) == ("linear", seed, weights, "resnet18")
    assert {e.name for e in sweep.experiments.values() if e.stage == "cls"} == {
        "tiny-spark-cls", "tiny-scratch-cls", *(f"tiny-{a}-lin-s{s}" for a in ("spark", "scratch") for s in range(3))}


def _sweep(tmp_path, text: str):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return load_sweep_file(path)


NEED = """
    needs:
      w: {about: weights, default: "${run:a}/best.pth"}
    experiments:
      - {name: a, stage: cls, args: "--config tiny --weights none"}
      - {name: f, stage: command, module: slurm.require, args: "${w}", creates: ["${w}"], after: [a]}
      - {name: b, stage: cls, args: "--config tiny --weights ${w}", after: [f]}
"""


def test_a_need_default_fills_in_and_must_be_waited_for(tmp_path):
    sweep = _sweep(tmp_path, NEED)
    b = sweep.experiments["b"]
    assert b.after == ("f",) and dict(b.fallbacks) == {"w": "${run:a}/best.pth"}
    assert resolve_args(b, b.args, "/r", {})[-1] == "/r/a/best.pth"
    assert resolve_args(b, b.args, "/r", {"w": "/mine.pth"})[-1] == "/mine.pth"
    with pytest.raises(SweepError, match="experiment b uses a need whose default is in the run folder of a"):
        _sweep(tmp_path, NEED.replace("after: [f]", ""))
    with pytest.raises(SweepError, match=r"a default may use \$\{run:NAME\} and \$\{root\}, not \$\{imagenet\}"):
        _sweep(tmp_path, NEED.replace("${run:a}/best.pth", "${imagenet}/x"))


def test_seeds_make_one_run_per_seed(tmp_path):
    sweep = _sweep(tmp_path, """
        experiments:
          - {name: p, stage: cls, seeds: [0, 2], args: "--config tiny --weights none"}
    """)
    assert {n: e.args[-2:] for n, e in sweep.experiments.items()} == {"p-s0": ("--seed", "0"),
                                                                      "p-s2": ("--seed", "2")}
    for bad in ("[]", "[1, 1]", "[-1]", "three"):
        with pytest.raises(SweepError, match="seeds must be a list of distinct integers"):
            _sweep(tmp_path, f"experiments:\n  - {{name: p, stage: cls, seeds: {bad}, args: '--config tiny'}}\n")


def test_require_names_a_missing_file_in_one_line(tmp_path, capsys):
    there = tmp_path / "there.pth"
    there.write_bytes(b"x")
    assert require_main([str(there)]) == 0
    assert require_main([str(there), str(tmp_path / "gone.pth")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m slurm.require: error: missing {tmp_path / 'gone.pth'} (the run that writes it has not, "
                   "or the path given with --path is wrong)"]
