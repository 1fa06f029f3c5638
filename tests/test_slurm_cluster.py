"""The sweep against a real SLURM (slurm/local_cluster.sh up): the tiny sweep through sbatch with afterok
dependencies, idempotent relaunches, and preemption (signal, save, requeue, resume to the same weights).

Without a cluster these tests skip, except under CI (``CI`` set), where they fail: .ci/run brings the cluster up.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import require
from test_slurm_support import LAUNCHER, Tool, require_slurm, run_tool

from slurm.stages import STAGE_MODULES

# The tiny sweep shortened for CI: 64 demo images of 64 px, 6 epochs of 8 steps, no loader workers (an
# interrupted run resumes bit-exactly only with --workers 0), one metrics line per step; one fine-tuning epoch;
# 8 + 4 detection images, 4 Mask R-CNN iterations. One CPU per job, so two jobs share the 2-core machine instead
# of waiting in turn.
SHORT = ["--cpus-per-task", "1", "--resources", "command.cpus_per_task=1",
         "--extra-args", "tiny-images=--classes 2 --train-per-class 32 --val-per-class 2 --image-size 64",
         "--extra-args", "pretrain=--epochs 6 --input-size 64 --batch-size 8 --global-batch 8 --workers 0 "
                         "--no-progress --log-every 1",
         "--extra-args", "cls=--epochs 1 --input-size 64 --batch-size 8 --global-batch 8 --workers 0 --no-progress",
         "--extra-args", "tiny-coco=--train-images 8 --val-images 4",
         "--extra-args", "det=SOLVER.MAX_ITER 4 SOLVER.STEPS (2,3) SOLVER.WARMUP_ITERS 1"]
# The stages of the tiny sweep: all of them run (a stage that cannot be imported fails under CI, see conftest.py).
STAGES = ("pretrain", "cls", "det")
STARTED = re.compile(r"submitit INFO \((.+?)\) - Starting with")
FINISHED = re.compile(r"submitit INFO \((.+?)\) - Exiting after successful completion")


def _stages() -> str:
    for stage in STAGES:
        require(STAGE_MODULES[stage])
    return ",".join(STAGES)


def _launch(root: Path, *extra: str) -> Tool:
    return run_tool(LAUNCHER, "--sweep", "tiny", "--cluster", "slurm", "--stage", _stages(), "--root", str(root),
                    "--tables-out", str(root / "tables"), "--poll-s", "2", *SHORT, *extra, timeout=600)


def _state(root: Path) -> dict:
    return json.loads((root / "sweep-state.json").read_text())


def _job(root: Path, name: str) -> str:
    return _state(root)["experiments"][name]["job_id"]


def _squeue(job: str) -> tuple[str, str]:
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%T|%r"], capture_output=True, text=True,
                         check=False).stdout.strip()
    return tuple(out.split("|")) if out else ("", "")


def _logs(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run / "logs").glob("*_log.*")))


def _wait(predicate, timeout: float, what: str, run: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    queue = subprocess.run(["squeue", "--states=all"], capture_output=True, text=True, check=False).stdout
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\nqueue:\n{queue}\nlogs:\n{_logs(run)[-3000:]}")


def _cancel_leftovers(root: Path) -> None:
    if (root / "sweep-state.json").exists():
        jobs = [e["job_id"] for e in _state(root)["experiments"].values()] + \
               [_state(root).get("tables_job", {}).get("job_id", "")]
        subprocess.run(["scancel", *[j for j in jobs if j]], capture_output=True, check=False)


def _encoder(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "tiny-pretrain" / "encoder_timm.pth", map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The shortened tiny sweep launched three times: submit, relaunch at once, relaunch with --wait."""
    require_slurm()
    root = tmp_path_factory.mktemp("tiny-sweep")
    try:
        first = _launch(root)
        second = _launch(root)
        third = _launch(root, "--wait")
        yield root, first, second, third
    finally:
        _cancel_leftovers(root)


def test_tiny_sweep_runs_through_sbatch_with_afterok(tiny_sweep):
    root, first, _, third = tiny_sweep
    assert first.returncode == 0, first.stderr
    assert first.heavy == [], "submitting must not import torch or timm"
    images, pretrain = _job(root, "tiny-images"), _job(root, "tiny-pretrain")
    assert f"submitted tiny-pretrain: job {pretrain} (afterok {images})" in first.stdout
    script = (root / "tiny-pretrain" / "logs" / f"{pretrain}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{images}" in script and "#SBATCH --signal=USR2@30" in script
    assert third.returncode == 0, third.stdout + third.stderr
    assert re.search(r"tiny-pretrain\s+pretrain\s+completed\s+" + pretrain + r"\s.*loss \d\.\d{3}", third.stdout)
    # the child started only after its parent had finished
    ended = FINISHED.search(_logs(root / "tiny-images")).group(1)
    started = STARTED.search(_logs(root / "tiny-pretrain")).group(1)
    assert started >= ended
    result = json.loads((root / "tiny-pretrain" / "result.json").read_text())
    assert result["stage"] == "pretrain" and len(result["metrics"]["epoch_losses"]) == 6
    tables = root / "tables"
    assert (tables / "pretrain_loss.png").stat().st_size > 10_000 and (tables / "table3.md").exists()
    # every job of the tiny sweep ran: the miniature of tables 3, 6 is complete
    rows = [line for line in (tables / "tiny.md").read_text().splitlines() if line.startswith("| SparK (tiny")]
    assert len(rows) == 1 and "tiny-spark-cls, tiny-spark-det" in rows[0]
    assert re.search(r"^\| [^|]+ \| \d+\.\d \(n=1\) \| \d+\.\d ± \d+\.\d \(n=3\) \| \d+\.\d \(n=1\) \| "
                     r"\d+\.\d \(n=1\) \|", rows[0]), "fine-tuning, linear probe over 3 seeds, box and mask AP"
    assert (tables / "finetune_top1.png").stat().st_size > 10_000
    # submitit got each kind's requeue cap (slurm/sweeps/resources.yaml): it is in the submitted job
    for name, cap in (("tiny-pretrain", 60), ("tiny-spark-cls", 20), ("tiny-spark-det", 20)):
        with open(root / name / "logs" / f"{_job(root, name)}_submitted.pkl", "rb") as handle:
            assert pickle.load(handle)._timeout_countdown == cap, name


def test_launching_again_submits_nothing(tiny_sweep):
    root, first, second, _ = tiny_sweep
    assert "submitted" not in second.stdout, "pending or running jobs were submitted twice"
    assert re.search(r"skip tiny-pretrain: (pending|running|configuring) as job " + _job(root, "tiny-pretrain"),
                     second.stdout)
    before = _state(root)
    again = _launch(root)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    assert "skip tiny-pretrain: completed" in again.stdout
    assert _state(root) == before
    status = run_tool(LAUNCHER, "--status", "--root", str(root))
    assert status.returncode == 0 and status.heavy == []
    assert re.search(r"tiny-pretrain\s+pretrain\s+completed", status.stdout)


INTERRUPTIONS = {  # how -> (command, the signal the stage sees)
    # SLURM delivers the job's preemption signal now, as --signal=USR2@delay does before the time limit: the stage
    # saves, submitit's handler requeues the job with --resume auto.
    "usr2": (["scancel", "--signal=USR2"], "SIGUSR2"),
    # scontrol requeue: SIGTERM, the stage saves, the job ends, SLURM requeues it and it resumes.
    "requeue": (["scontrol", "requeue"], "SIGTERM"),
}


def test_interrupted_pretraining_is_requeued_and_resumes_to_the_same_weights(tiny_sweep, tmp_path):
    """Both interruptions at once (two roots): signalled mid-training, saved, requeued, released at once
    (``scontrol update StartTime=now``), resumed, and finished with the weights of the uninterrupted sweep."""
    reference = tiny_sweep[0]
    roots = {how: tmp_path / how for how in INTERRUPTIONS}
    jobs = {}
    try:
        for how, root in roots.items():
            launched = _launch(root, "--stage", "pretrain", "--no-tables")
            assert launched.returncode == 0, launched.stderr
            jobs[how] = _job(root, "tiny-pretrain")
        for how, root in roots.items():
            run, job = root / "tiny-pretrain", jobs[how]
            _wait(lambda run=run: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0,
                  300, "the first training step", run)
            assert not (run / "result.json").exists(), "the run finished before it could be interrupted"
            subprocess.run([*INTERRUPTIONS[how][0], job], check=True)
        for how, root in roots.items():
            run, job = root / "tiny-pretrain", jobs[how]
            _wait(lambda job=job: _squeue(job) == ("PENDING", "BeginTime"), 120, "the requeued job", run)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        for how, root in roots.items():
            run, job = root / "tiny-pretrain", jobs[how]
            _wait(lambda run=run, job=job: (run / "result.json").exists() and _squeue(job)[0] in ("COMPLETED", ""),
                  300, "the resumed run", run)
    finally:
        for root in roots.values():
            _cancel_leftovers(root)
    uninterrupted = _encoder(reference)
    for how, root in roots.items():
        logs, job = _logs(root / "tiny-pretrain"), jobs[how]
        assert re.search(rf"stopped by {INTERRUPTIONS[how][1]} at epoch \d+, iteration \d+: saved ", logs), how
        if how == "usr2":
            assert f"Requeued job {job}" in logs, "submitit did not requeue the job"
        commands = re.findall(r"\[sweep\] tiny-pretrain: python -m pretrain (.*)", logs)
        assert len(commands) == 2 and "--resume auto" not in commands[0] and "--resume auto" in commands[1], how
        assert re.search(r"resumed from .*checkpoint-last.pth: epoch \d+, iteration [1-9]", logs), how
        assert _job(root, "tiny-pretrain") == job, "the same job was requeued, not a new one submitted"
        resumed = _encoder(root)
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), f"{how}: resumed weights differ"


DOWNSTREAM = {"tiny-spark-cls": "--resume auto", "tiny-spark-det": "--resume"}  # job -> its resume flag


def _training(run: Path) -> bool:
    """Whether the run has written its first metrics line (fine-tuning: step 1 here; detection: iteration 20)."""
    return (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0


def test_fine_tuning_and_detection_jobs_are_requeued_and_resume(tiny_sweep, tmp_path):
    """The downstream jobs of the sweep (their parents' finished runs copied from the launched sweep) preempted
    with SLURM's signal mid-training: each saves, is requeued as the same job with its stage's resume flag, resumes
    from its checkpoint and finishes."""
    reference, root = tiny_sweep[0], tmp_path / "runs"
    for parent in ("tiny-images", "tiny-coco", "tiny-pretrain"):
        shutil.copytree(reference / parent, root / parent)
    longer = ["--extra-args", "tiny-spark-cls=--epochs 2 --log-every 1",
              "--extra-args", "tiny-spark-det=SOLVER.MAX_ITER 30 SOLVER.STEPS (20,25)"]
    jobs = {}
    try:
        launched = _launch(root, "--stage", "cls,det", "--only", ",".join(DOWNSTREAM), "--no-tables", *longer)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert "submitted tiny-spark-cls" in launched.stdout and "submitted tiny-spark-det" in launched.stdout
        jobs = {name: _job(root, name) for name in DOWNSTREAM}
        for name in DOWNSTREAM:
            _wait(lambda run=root / name: _training(run), 300, f"{name} training", root / name)
            assert not (root / name / "result.json").exists(), f"{name} finished before it could be interrupted"
            subprocess.run(["scancel", "--signal=USR2", jobs[name]], check=True)
        for name, job in jobs.items():
            _wait(lambda job=job: _squeue(job) == ("PENDING", "BeginTime"), 120, f"{name} requeued", root / name)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        for name, job in jobs.items():
            _wait(lambda run=root / name, job=job: (run / "result.json").exists()
                  and _squeue(job)[0] in ("COMPLETED", ""), 300, f"{name} resumed", root / name)
    finally:
        _cancel_leftovers(root)
    for name, resume in DOWNSTREAM.items():
        logs = _logs(root / name)
        assert f"Requeued job {jobs[name]}" in logs and "stopped by SIGUSR2" in logs, name
        commands = re.findall(rf"\[sweep\] {name}: python -m \S+ (.*)", logs)
        assert len(commands) == 2 and resume not in commands[0] and resume in commands[1], (name, commands)
        assert re.search(r"resumed from \S*checkpoint-last.pth", logs), name
        assert _job(root, name) == jobs[name], "the same job was requeued, not a new one submitted"


@pytest.mark.slow
def test_time_limit_requeues_until_the_run_finishes(tmp_path):
    """A job whose time limit (1 min) is shorter than its run: SLURM signals USR2 40 s before each limit, the
    stage saves, submitit requeues; the run ends with the weights of an uninterrupted one."""
    require_slurm()
    longer = ["--extra-args", "pretrain=--epochs 30"]
    roots = {"reference": tmp_path / "reference", "limited": tmp_path / "limited"}
    try:
        assert _launch(roots["reference"], "--stage", "pretrain", "--no-tables", *longer).returncode == 0
        limits = ["--resources", "pretrain.timeout_min=1", "--resources", "pretrain.signal_delay_s=40",
                  "--resources", "pretrain.max_num_timeout=10"]
        assert _launch(roots["limited"], "--stage", "pretrain", "--no-tables", *longer, *limits).returncode == 0
        job, run = _job(roots["limited"], "tiny-pretrain"), roots["limited"] / "tiny-pretrain"

        def finished_or_release() -> bool:
            if _squeue(job) == ("PENDING", "BeginTime"):
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
            return (run / "result.json").exists() and (roots["reference"] / "tiny-pretrain" / "result.json").exists()

        _wait(finished_or_release, 900, "both runs", run)
    finally:
        for root in roots.values():
            _cancel_leftovers(root)
    logs = _logs(run)
    assert "this job is timed-out" in logs and f"Requeued job {job}" in logs
    assert re.search(r"stopped by SIGUSR2 at epoch \d+", logs)
    resumed, uninterrupted = _encoder(roots["limited"]), _encoder(roots["reference"])
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
