"""One-launch checkpoint evaluation through the local SLURM cluster (slurm/local_cluster.sh up): a ResNet-18
``encoder_timm.pth`` through the demo template (evaluate-tiny.yaml) cut to its shortest: demo data, fine-tuning and
the linear probe for one epoch, two Mask R-CNN iterations, with ``afterok`` dependencies, then the evaluation table;
a relaunch submits nothing.

Without a cluster it skips, except under CI (``CI`` set), where it fails: .ci/run brings the cluster up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import timm
import torch
from test_slurm_support import LAUNCHER, require_slurm, run_tool

from pretrain.checkpoint import encoder_payload

SHORT = ["--cpus-per-task", "1", "--resources", "command.cpus_per_task=1", "--poll-s", "2",
         "--extra-args", "demo-images=--classes 2 --train-per-class 8 --val-per-class 2 --image-size 64",
         "--extra-args", "cls=--epochs 1 --warmup-epochs 0 --input-size 64 --batch-size 8 --global-batch 8 "
                         "--workers 0 --no-progress --no-tensorboard",
         "--extra-args", "demo-coco=--train-images 4 --val-images 2 --image-size 64",
         "--extra-args", "det=SOLVER.MAX_ITER 2 SOLVER.STEPS (1,) SOLVER.WARMUP_ITERS 1 SOLVER.IMS_PER_BATCH 2 "
                         "INPUT.MIN_SIZE_TRAIN (64,) INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64 "
                         "INPUT.MAX_SIZE_TEST 64"]


def _launch(root: Path, weights: Path, *extra: str):
    return run_tool(LAUNCHER, "--stage", "cls,det", "--weights", str(weights), "--cluster", "slurm", "--root",
                    str(root), *SHORT, *extra, timeout=600)


def test_a_checkpoint_runs_through_the_demo_experiments_on_slurm(tmp_path):
    require_slurm()
    weights = tmp_path / "resnet18-encoder.pth"
    torch.manual_seed(0)
    torch.save(encoder_payload(timm.create_model("resnet18", num_classes=0).state_dict(), "resnet18", {}), weights)
    root = tmp_path / "eval"
    try:
        launched = _launch(root, weights, "--wait")
    finally:
        state = root / "sweep-state.json"
        if state.exists():
            jobs = [e["job_id"] for e in json.loads(state.read_text())["experiments"].values()]
            run_tool("-c", f"import subprocess; subprocess.run(['scancel', *{jobs!r}])")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    experiments = json.loads((root / "sweep-state.json").read_text())["experiments"]
    assert set(experiments) == {"demo-images", "demo-coco", "demo-ft", "demo-linear", "demo-det"}
    assert (f"submitted demo-det: job {experiments['demo-det']['job_id']} "
            f"(afterok {experiments['demo-coco']['job_id']})") in launched.stdout
    for name, protocol in (("demo-ft", "finetune"), ("demo-linear", "linear")):
        result = json.loads((root / name / "result.json").read_text())
        assert result["inputs"]["weights"] == str(weights) and result["metrics"]["protocol"] == protocol
        assert (root / name / "model_best.pth").exists()
    det = json.loads((root / "demo-det" / "result.json").read_text())
    assert (det["model"], det["inputs"]["weights"]) == ("resnet18", str(weights))
    table = (root / "tables" / "evaluation.md").read_text()
    assert "no SparK row of this ResNet in the paper" in table  # resnet18: the ResNet table, no paper numbers
    row = next(line for line in table.splitlines() if "demo-det, demo-ft, demo-linear" in line)
    assert re.match(r"^\| this checkpoint \| \d+\.\d \| \d+\.\d \| \d+\.\d \| \d+\.\d \|", row), row
    again = _launch(root, weights, "--model", "resnet18")
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
