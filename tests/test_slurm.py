"""The sweep without a cluster: sweep data, the paper dry run, planning against the state file, resources,
the job's preemption protocol, and a local launch run twice (no torch in the launcher)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import textwrap

import pytest
from conftest import require
from test_slurm_support import LAUNCHER, run_tool

from pretrain.runtime.result import write_result
from pretrain.runtime.stage import Outcome
from slurm.jobs import JobError, StageJob
from slurm.launcher import main as launch_main
from slurm.launcher import make_plan
from slurm.resources import load_resources
from slurm.stages import JobSpec
from slurm.state import JobState, SweepState
from slurm.sweep import SweepError, apply_extra_args, load_sweep, load_sweep_file, resolve_args

PAPER_TABLES = ("1", "2", "3", "4", "5", "6")


def test_paper_dry_run_lists_every_experiment_without_torch(tmp_path):
    tool = run_tool(LAUNCHER, "--sweep", "paper", "--dry-run", "--root", str(tmp_path), "--imagenet", "/data/in1k")
    assert tool.returncode == 0, tool.stderr
    assert tool.heavy == [], "planning a sweep must not import torch or timm"
    assert "submitit" not in tool.imported, "a dry run submits nothing: no submitit"
    sweep = load_sweep("paper")
    assert f"sweep paper: {len(sweep.experiments)} experiments (tables 1, 2, 3, 4, 5, 6)" in tool.stdout
    graph = tool.stdout.split("commands:")[0].splitlines()
    lines = {line.split()[1]: line for line in graph if line[:3].strip().isdigit()}
    assert set(lines) == set(sweep.experiments)
    assert {t for e in sweep.experiments.values() for t in e.tables} == set(PAPER_TABLES)
    # afterok edges and resources per kind
    assert "r50-spark-pt" in lines["r50-spark-cls"].split("submit")[1]
    assert "r50-spark-d2" in lines["r50-spark-det-1x"]
    assert "4x8 GPU" in lines["cnxs-zero-pt"] and "2x8 GPU" in lines["cnxs-zero-cls"]
    assert "python -m pretrain --out " + str(tmp_path / "cnxs-nohier-pt") + " --preset paper --data /data/in1k/train " \
           "--model convnext_small --no-hierarchy" in tool.stdout
    assert not (tmp_path / "sweep-state.json").exists(), "a dry run writes nothing"


def test_table_subsets_hold_each_experiment_once_with_its_dependencies():
    paper = load_sweep("paper")
    union = {}
    for name in ("table1", "table3", "table4", "table5", "table6"):
        subset = load_sweep(name)
        for exp in subset.experiments.values():
            assert set(exp.after) <= set(subset.experiments), f"{name}: {exp.name} misses a dependency"
            assert union.setdefault(exp.name, exp) == exp
    assert set(union) == set(paper.experiments)
    assert {"r50-spark-pt", "r50-spark-d2", "r50-sup-det-2x", "r50-sup-cls"} <= set(load_sweep("table3").experiments)
    table5 = load_sweep("table5").experiments
    assert {"cnxs-sup-cls", "cnxs-spark-cls", "cnxs-zero-cls", "cnxs-nohier-cls", "cnxs-ape-cls",
            "cnxs-lossall-cls", "cnxs-ep800-cls"} <= set(table5)


EXPECTED = {  # stage -> experiment -> (config field, value) its flags must produce
    "pretrain": {"cnxs-zero-pt": ("masking", "zero"), "cnxs-nohier-pt": ("hierarchy", False),
                 "cnxs-ape-pt": ("ape", True), "cnxs-lossall-pt": ("loss_on", "all"), "cnxs-ep800-pt": ("epochs", 800),
                 "cnxl384-spark-pt": ("input_size", 384), "r50-spark-pt": ("epochs", 1600)},
    "cls": {"r50-spark-linear": ("protocol", "linear"), "cnxl384-spark-cls": ("input_size", 384),
            "r50-sup-cls": ("weights", "none"), "cnxs-spark-cls": ("epochs", 200)},
}


@pytest.mark.parametrize("stage", ["pretrain", "cls"])
def test_stage_flags_of_every_sweep_resolve_with_the_stage_parser(tmp_path, stage):
    module = {"pretrain": "pretrain.__main__", "cls": "downstream.cls.__main__"}[stage]
    command = require(module).COMMAND
    checked = set()
    for sweep in (load_sweep("paper"), load_sweep("tiny")):
        for exp in sweep.experiments.values():
            if exp.stage != stage:
                continue
            argv = ["--out", str(tmp_path / exp.name), *resolve_args(exp, exp.args, str(tmp_path),
                                                                     {"imagenet": "/data/in1k"})]
            cfg, _ = command.parse(argv)
            if exp.name in EXPECTED[stage]:
                field, value = EXPECTED[stage][exp.name]
                assert getattr(cfg, field) == value, exp.name
                checked.add(exp.name)
    assert checked == set(EXPECTED[stage])


def _write_sweep(tmp_path, text: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


GRAPH = """
    experiments:
      - {name: data, stage: command, module: pretrain.data, args: "make-demo ${out}/d", creates: ["${out}/d/demo.json"]}
      - {name: pt, stage: pretrain, args: "--preset tiny --data ${run:data}/d/train"}
      - {name: cls, stage: cls, args: "--weights ${run:pt}/encoder_timm.pth --data ${run:data}/d"}
      - {name: det, stage: det, args: "--weights ${run:pt}/encoder_timm.pth"}
"""


def _plan(sweep, root, state, live=None, stages=("pretrain", "cls", "det"), retry=False):
    steps = make_plan(sweep, sweep.select(stages), str(root), {}, load_resources(), state, live or {}, retry)
    return {s.exp.name: s for s in steps}


def test_plan_follows_the_disk_and_the_state_file(tmp_path):
    sweep = load_sweep_file(_write_sweep(tmp_path, GRAPH))
    root = tmp_path / "runs"
    state = SweepState(str(root))
    plan = _plan(sweep, root, state)
    assert {n: s.action for n, s in plan.items()} == dict.fromkeys(("data", "pt", "cls", "det"), "submit")
    assert plan["cls"].parents == ("pt", "data") and plan["data"].parents == ()

    # finished work is found on disk: the data step's file, the pretraining run's result.json
    (root / "data" / "d").mkdir(parents=True)
    (root / "data" / "d" / "demo.json").write_text("{}")
    write_result(str(root / "pt"), "pretrain", "resnet18", {"loss_last_epoch": 0.5}, {})
    # cls is running as job 123; det failed as job 124 (the error submitit pickled)
    state.record("cls", {"job_id": "123", "cluster": "slurm", "logs": str(root / "cls" / "logs")})
    (root / "det" / "logs").mkdir(parents=True)
    with open(root / "det" / "logs" / "124_0_result.pkl", "wb") as handle:
        pickle.dump(("error", "Traceback (most recent call last):\nValueError: boom"), handle)
    state.record("det", {"job_id": "124", "cluster": "slurm", "logs": str(root / "det" / "logs")})
    plan = _plan(sweep, root, state, {"123": JobState("running", "", "0:42")})
    assert [plan[n].reason for n in ("data", "pt")] == ["completed", "completed"]
    assert plan["cls"].action == "skip" and plan["cls"].reason == "running as job 123"
    assert plan["det"].action == "skip" and "ValueError: boom" in plan["det"].reason
    plan = _plan(sweep, root, state, {"123": JobState("running")}, retry=True)
    assert plan["det"].action == "submit" and plan["det"].parents == ()


def test_later_stages_wait_for_running_pretraining_or_are_blocked(tmp_path):
    sweep = load_sweep_file(_write_sweep(tmp_path, GRAPH))
    root = tmp_path / "runs"
    state = SweepState(str(root))
    plan = _plan(sweep, root, state, stages=("cls",))
    assert list(plan) == ["data", "cls"], "command steps come along, other stages do not"
    assert plan["cls"].action == "blocked" and "pt (not submitted; launch its stage (pretrain))" in plan["cls"].reason
    state.record("pt", {"job_id": "7", "cluster": "slurm", "logs": str(root / "pt" / "logs")})
    plan = _plan(sweep, root, state, {"7": JobState("pending", "Resources")}, stages=("cls",))
    assert plan["cls"].action == "submit" and plan["cls"].parents == ("pt", "data")


def test_state_file_is_written_atomically_and_keeps_earlier_jobs(tmp_path):
    state = SweepState(str(tmp_path))
    with state.locked():
        state.record("a", {"job_id": "1", "cluster": "slurm"})
        state.record("a", {"job_id": "2", "cluster": "slurm"})
    again = SweepState(str(tmp_path))
    assert again.experiments["a"]["job_id"] == "2" and again.experiments["a"]["history"] == ["1"]
    assert sorted(os.listdir(tmp_path)) == [".sweep-state.lock", "sweep-state.json"]


def test_resources_are_data_changed_by_the_sweep_then_by_flags():
    table = load_resources({"default": {"gpus_per_node": 0}, "pretrain": {"timeout_min": 30}},
                           {"nodes": 2, "gpus_per_node": None}, ["det.tasks=per-node", "command.mem_gb=2"])
    pretrain, det, command = table.get("pretrain"), table.get("det"), table.get("command")
    assert (pretrain.nodes, pretrain.gpus_per_node, pretrain.timeout_min, pretrain.tasks_per_node) == (2, 0, 30, 1)
    assert command.nodes == 1 and command.mem_gb == 2, "node-shape flags leave the CPU steps alone"
    assert det.tasks == "per-node"
    assert load_resources().get("cls").tasks_per_node == 8
    for bad in (["pretrain.gpus=3"], ["pretrain.nodes=two"], ["nokind.nodes=1"], ["det.tasks=per-rack"]):
        with pytest.raises(SweepError):
            load_resources(overrides=bad)


def test_extra_args_and_placeholders(tmp_path):
    sweep = load_sweep("tiny")
    changed = apply_extra_args(sweep.experiments, ["pretrain=--epochs 1", "tiny-*-cls=--epochs 2"])
    assert changed["tiny-pretrain"].args[-2:] == ("--epochs", "1")
    assert changed["tiny-spark-cls"].args[-2:] == ("--epochs", "2") and changed["tiny-images"] == \
        sweep.experiments["tiny-images"]
    with pytest.raises(SweepError, match="matches no experiment"):
        apply_extra_args(sweep.experiments, ["nothing=--x"])
    paper = load_sweep("paper").experiments["r50-spark-pt"]
    with pytest.raises(SweepError, match="needs --imagenet DIR"):
        resolve_args(paper, paper.args, str(tmp_path), {})
    assert "${imagenet}/train" in resolve_args(paper, paper.args, str(tmp_path), {}, missing_ok=True)


@pytest.mark.parametrize(("text", "message"), [
    ("experiments:\n  - {name: a, stage: pretrain, colour: red}\n", "unknown keys ['colour']"),
    ("experiments:\n  - {name: a, stage: pretrain}\n  - {name: a, stage: cls}\n", "defined twice"),
    ("experiments:\n  - {name: a, stage: cls, args: '${run:b}'}\n  - {name: b, stage: cls, args: '${run:a}'}\n",
     "dependency cycle"),
    ("experiments:\n  - {name: a, stage: cls, args: '${run:zz}'}\n", "unknown experiment 'zz'"),
    ("experiments:\n  - {name: a, stage: cls, args: '--data ${imagenet}'}\n", "'needs' does not declare"),
    ("experiments:\n  - {name: a, stage: train}\n", "stage 'train' is not one of"),
])
def test_bad_sweep_files_are_one_line_usage_errors(tmp_path, capsys, text, message):
    path = _write_sweep(tmp_path, text)
    with pytest.raises(SystemExit) as exit_:
        launch_main(["--sweep", path, "--dry-run", "--root", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("python slurm/launch_all.py: error:")


def _spec(tmp_path, stage="pretrain", **kwargs):
    return JobSpec(name="x", stage=stage, argv=("--preset", "tiny"), out=str(tmp_path / "x"), **kwargs)


def test_checkpoint_requeues_the_job_with_the_stage_resume_flag(tmp_path):
    job = StageJob(_spec(tmp_path))
    assert job.spec.stage_argv() == ["--out", str(tmp_path / "x"), "--preset", "tiny"]
    requeued = job.checkpoint()
    assert isinstance(requeued.function, StageJob) and requeued.args == ()
    assert requeued.function.spec.stage_argv()[:4] == ["--out", str(tmp_path / "x"), "--resume", "auto"]
    det = StageJob(_spec(tmp_path, "det")).checkpoint().function
    assert det.spec.stage_argv()[:4] == ["--out", str(tmp_path / "x"), "--resume", "auto"]
    # a run folder with a checkpoint resumes even without the flag (a job SLURM itself requeued)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "checkpoint-last.pth").write_bytes(b"")
    assert "--resume" in job.spec.stage_argv()


def test_a_stop_by_the_preemption_signal_goes_back_to_submitit(tmp_path):
    job = StageJob(_spec(tmp_path))
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        stopped = job._stopped(Outcome("stopped", "stopped by SIGUSR2 at epoch 1", str(tmp_path), "SIGUSR2"))
        assert received == [signal.SIGUSR2] and stopped["status"] == "stopped"
        with pytest.raises(JobError, match="stopped by SIGTERM .* no afterok job starts"):
            job._stopped(Outcome("stopped", "stopped by SIGTERM at epoch 1", str(tmp_path), "SIGTERM"))
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # outside submitit: no handler, so no requeue either
        with pytest.raises(JobError):
            job._stopped(Outcome("stopped", "stopped by SIGUSR2", str(tmp_path), "SIGUSR2"))
    finally:
        signal.signal(signal.SIGUSR2, previous)


LOCAL_SWEEP = """
    experiments:
      - {name: demo, stage: command, module: pretrain.data, creates: ["${out}/d/demo.json"],
         args: "make-demo ${out}/d --classes 1 --train-per-class 1 --val-per-class 1 --image-size 32"}
      - {name: bad, stage: command, module: pretrain.data, args: "check ${root}/missing", creates: ["${out}/never"]}
      - {name: child, stage: command, module: pretrain.data, args: "check ${run:bad}", creates: ["${out}/never"]}
"""


def test_local_launch_runs_once_and_a_second_launch_submits_nothing(tmp_path):
    path = _write_sweep(tmp_path, LOCAL_SWEEP)
    root, tables = tmp_path / "runs", tmp_path / "tables"
    argv = [LAUNCHER, "--cluster", "local", "--sweep", path, "--root", str(root), "--tables-out", str(tables)]
    first = run_tool(*argv)
    assert first.returncode == 1, "a failed job makes the launch fail"
    assert first.heavy == [], "the launcher submits without importing torch"
    assert "failed bad:" in first.stdout and "blocked child: needs bad (failed)" in first.stdout
    assert (root / "demo" / "d" / "demo.json").exists() and (tables / "table3.md").exists()
    state = SweepState(str(root)).experiments
    assert set(state) == {"demo", "bad"}
    second = run_tool(*argv)
    assert "skip demo: completed" in second.stdout and "--retry-failed resubmits" in second.stdout
    assert "running" not in second.stdout and SweepState(str(root)).experiments == state
    status = run_tool(LAUNCHER, "--status", "--root", str(root))
    assert status.returncode == 0 and status.heavy == [] and "submitit" not in status.imported
    assert f"tables: {tables} (python -m results" in status.stdout, "--status points to the launch's tables"
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:-2] if line.strip()}
    assert " completed " in rows["demo"] and " failed (" in rows["bad"] and "demo/logs/" in rows["demo"]


def test_detection_flags_of_every_sweep_resolve_with_the_detection_stage(tmp_path, capsys):
    train = require("downstream.det.train")
    iterations = {}
    for sweep in (load_sweep("paper"), load_sweep("tiny")):
        for exp in sweep.experiments.values():
            if exp.stage != "det":
                continue
            argv = resolve_args(exp, exp.args, str(tmp_path), {"coco": str(tmp_path)})
            argv[argv.index("--weights") + 1] = "none"  # the weights do not exist before the sweep runs
            outcome = train.run(["--out", str(tmp_path / exp.name), *argv, "--print-config"])
            assert outcome.status == "printed", exp.name
            iterations[exp.name] = json.loads(capsys.readouterr().out)["detectron2"]["SOLVER"]["MAX_ITER"]
    assert abs(iterations["r50-spark-det-2x"] - 2 * iterations["r50-spark-det-1x"]) <= 1  # 24 epochs, rounded
    assert abs(iterations["cnxb-spark-det-3x"] - 3 * iterations["r50-spark-det-1x"]) <= 3  # 36 epochs, rounded


def test_detection_jobs_on_several_nodes_get_detectron2_launch_flags(tmp_path, monkeypatch):
    from slurm.jobs import _distributed_flags

    def flags(job_id: str, node: int) -> list[str]:
        env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id, "SLURM_JOB_NUM_NODES": "2",
               "SLURM_NODEID": str(node), "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": str(node),
               "SLURM_NTASKS": "2"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return _distributed_flags(_spec(tmp_path, "det", nodes=2, gpus_per_node=8, per_node=True))

    first, second = flags("1234", 0), flags("1234", 1)
    assert first[:6] == ["--num-gpus", "8", "--num-machines", "2", "--machine-rank", "0"] and second[5] == "1"
    url = first[first.index("--dist-url") + 1]
    host, port = re.fullmatch(r"tcp://(\S+):(\d+)", url).groups()
    assert host == "gpu07" and 1024 < int(port) < 65536, "machine 0 of the job's nodes, a usable port"
    assert second[second.index("--dist-url") + 1] == url, "every node of the job meets at the same address"
    assert flags("1235", 0)[-1] != url, "another job (maybe on the same nodes) gets another port"
    assert _distributed_flags(_spec(tmp_path, "det", nodes=1, gpus_per_node=1, per_node=True)) == []


def test_only_launches_the_matching_experiments_and_the_steps_they_need(tmp_path):
    tool = run_tool(LAUNCHER, "--dry-run", "--root", str(tmp_path), "--only", "tiny-*-cls")
    assert tool.returncode == 0, tool.stderr
    rows = {line.split()[1]: line for line in tool.stdout.split("commands:")[0].splitlines()
            if line[:3].strip().isdigit()}
    assert set(rows) == {"tiny-images", "tiny-spark-cls", "tiny-scratch-cls"}  # the data step comes along
    assert "blocked: needs tiny-pretrain" in rows["tiny-spark-cls"] and " submit " in rows["tiny-scratch-cls"]


def _fake_slurm(folder, sinfo_exit: int) -> dict[str, str]:
    """A PATH whose sbatch and sinfo are stand-ins (sinfo exits with ``sinfo_exit``)."""
    folder.mkdir()
    for name, code in (("sbatch", 0), ("sinfo", sinfo_exit)):
        (folder / name).write_text(f"#!/bin/sh\nexit {code}\n")
        (folder / name).chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("sinfo_exit, cluster", [(0, "slurm"), (1, "local")])
def test_cluster_auto_is_slurm_only_when_a_controller_answers(tmp_path, sinfo_exit, cluster):
    tool = run_tool(LAUNCHER, "--dry-run", "--root", str(tmp_path / "runs"), "--cluster", "auto",
                    env=_fake_slurm(tmp_path / "bin", sinfo_exit))
    assert tool.returncode == 0, tool.stderr
    assert f"cluster: auto ({cluster})" in tool.stdout


def test_requeue_cap_per_job_kind_reaches_submitit(tmp_path):
    from slurm.launcher import _executor

    table = load_resources()
    caps = {kind: table.get(kind).max_num_timeout for kind in ("pretrain", "cls", "det")}
    assert caps == {"pretrain": 60, "cls": 20, "det": 20}
    for kind, cap in caps.items():
        executor = _executor("slurm", _spec(tmp_path, kind), table.get(kind), {}, ())
        assert executor._executor.max_num_timeout == cap  # submitit requeues a timed-out job this often


STOPPED_SWEEP = """
    experiments:
      - {name: pt, stage: pretrain, args: "--preset tiny"}
      - {name: cls, stage: cls, args: "--weights ${run:pt}/encoder_timm.pth --data ${root}/data"}
"""


def test_a_job_stopped_by_sigterm_fails_and_blocks_its_dependants(tmp_path, monkeypatch, capsys):
    """A stage that saved and stopped on SIGTERM (scancel, scontrol requeue) ends its job as failed, so the jobs
    that need its result do not start (in-process: submitit's debug executor)."""
    import pretrain.__main__ as pretrain_stage

    def stopped(argv, stop=None):
        out = argv[argv.index("--out") + 1]
        return Outcome("stopped", "stopped by SIGTERM at epoch 1, iteration 3: saved", out, "SIGTERM")

    monkeypatch.setattr(pretrain_stage.COMMAND, "run", stopped)  # what a job calls (slurm.stages.stage_command)
    path = _write_sweep(tmp_path, STOPPED_SWEEP)
    code = launch_main(["--cluster", "debug", "--sweep", path, "--root", str(tmp_path / "runs"), "--no-tables"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "failed pt:" in out and "no afterok job starts" in out
    assert "blocked cls: needs pt (failed)" in out
    assert set(SweepState(str(tmp_path / "runs")).experiments) == {"pt"}


def test_a_job_runs_torch_on_the_cpus_slurm_gave_it(monkeypatch):
    """The local cluster (task/none) does not bind tasks to CPUs: a job must not start one thread per core of
    the node, or jobs sharing it oversubscribe the cores (seen: 20x slower steps with two jobs on 2 cores)."""
    import torch

    from slurm.jobs import _allotted_thread_env, _use_allotted_cpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert _allotted_thread_env() == {"OMP_NUM_THREADS": "1"}
    before = torch.get_num_threads()
    try:
        _use_allotted_cpus()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting wins
    assert _allotted_thread_env() == {}
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert _allotted_thread_env() == {}


def test_stage_and_command_jobs_run_on_the_cpus_slurm_gave_them(monkeypatch, tmp_path):
    """Through the job, not the helpers: a stage runs in-process with torch's threads set to SLURM_CPUS_PER_TASK,
    a command step gets OMP_NUM_THREADS for its own process."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    seen = []

    class RecordingStage:
        def run(self, argv):
            seen.append(torch.get_num_threads())
            return Outcome("completed", "done")

    monkeypatch.setattr("slurm.jobs.stage_command", lambda stage: RecordingStage())
    before = torch.get_num_threads()
    try:
        assert StageJob(_spec(tmp_path, "cls"))()["status"] == "completed"
    finally:
        torch.set_num_threads(before)
    assert seen == [1]

    (tmp_path / "report_threads.py").write_text(
        "import os, sys\nopen(sys.argv[1], 'w').write(os.environ.get('OMP_NUM_THREADS', 'unset'))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    report = tmp_path / "threads.txt"
    step = JobSpec(name="c", stage="command", argv=(str(report),), out=str(tmp_path / "c"),
                   module="report_threads", creates=(str(report),))
    assert StageJob(step)()["status"] == "completed"
    assert report.read_text() == "1"
