"""The sweep against a real SLURM (slurm/local_cluster.sh up): the tiny sweep through sbatch with afterok
dependencies, idempotent relaunches, and preemption (signal, save, requeue, resume to the same weights).

Without a cluster these tests skip, except under CI (``CI`` set), where they fail: .ci/run brings the cluster up.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_slurm_support import LAUNCHER, Tool, require_slurm, run_tool

from slurm.stages import STAGE_ENTRIES

# The tiny sweep shortened for CI: 64 demo images of 64 px, 6 epochs of 8 steps, no loader workers (an
# interrupted run resumes bit-exactly only with --workers 0), one metrics line per step.
SHORT = ["--extra-args", "tiny-images=--classes 2 --train-per-class 32 --val-per-class 2 --image-size 64",
         "--extra-args", "pretrain=--epochs 6 --input-size 64 --batch-size 8 --global-batch 8 --workers 0 "
                         "--no-progress --log-every 1"]
STARTED = re.compile(r"submitit INFO \((.+?)\) - Starting with")
FINISHED = re.compile(r"submitit INFO \((.+?)\) - Exiting after successful completion")


# The stages of the tiny sweep this test runs: the fine-tuning and detection stages join once they have landed
# (with shortening --extra-args above), so the whole sweep keeps within the test budget.
STAGES = ("pretrain",)


def _stages() -> str:
    return ",".join(s for s in STAGES if importlib.util.find_spec(STAGE_ENTRIES[s].module))


def _launch(root: Path, *extra: str) -> Tool:
    return run_tool(LAUNCHER, "--sweep", "tiny", "--cluster", "slurm", "--stage", _stages(), "--root", str(root),
                    "--tables", str(root / "tables"), "--poll-s", "2", *SHORT, *extra, timeout=600)


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
    if "cls" in _stages() and "det" in _stages():
        tiny = (tables / "tiny.md").read_text()
        assert "| SparK (tiny pretraining) | " in tiny and "tiny-spark-cls" in tiny and "tiny-spark-det" in tiny


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


@pytest.mark.parametrize("how", ["usr2", "requeue"])
def test_interrupted_pretraining_is_requeued_and_resumes_to_the_same_weights(tiny_sweep, tmp_path, how):
    """usr2: SLURM delivers the job's preemption signal (what --signal=USR2@delay sends before the time limit):
    the stage saves, submitit's handler requeues the job with --resume auto. requeue: ``scontrol requeue``
    (SIGTERM): the stage saves, the job ends, SLURM requeues it and it resumes from the checkpoint."""
    reference = tiny_sweep[0]
    root, run = tmp_path, tmp_path / "tiny-pretrain"
    try:
        launched = _launch(root, "--stage", "pretrain", "--no-tables")
        assert launched.returncode == 0, launched.stderr
        job = _job(root, "tiny-pretrain")
        _wait(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0, 300,
              "the first training step", run)
        assert not (run / "result.json").exists(), "the run finished before it could be interrupted"
        command = ["scancel", "--signal=USR2", job] if how == "usr2" else ["scontrol", "requeue", job]
        subprocess.run(command, check=True)
        _wait(lambda: _squeue(job) == ("PENDING", "BeginTime"), 120, "the requeued job", run)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        _wait(lambda: (run / "result.json").exists() and _squeue(job)[0] in ("COMPLETED", ""), 300,
              "the resumed run", run)
    finally:
        _cancel_leftovers(root)
    logs = _logs(run)
    signal_name = "SIGUSR2" if how == "usr2" else "SIGTERM"
    assert re.search(rf"stopped by {signal_name} at epoch \d+, iteration \d+: saved ", logs)
    if how == "usr2":
        assert f"Requeued job {job}" in logs, "submitit did not requeue the job"
    commands = re.findall(r"\[sweep\] tiny-pretrain: python -m pretrain (.*)", logs)
    assert len(commands) == 2 and "--resume auto" not in commands[0] and "--resume auto" in commands[1]
    assert re.search(r"resumed from .*checkpoint-last.pth: epoch \d+, iteration [1-9]", logs)
    assert _job(root, "tiny-pretrain") == job, "the same job was requeued, not a new one submitted"
    resumed, uninterrupted = _encoder(root), _encoder(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "resumed weights differ"


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
