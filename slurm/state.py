"""What the launcher knows of each experiment under a root: the state file, and the state of each job.

``ROOT/sweep-state.json`` (written atomically, under a lock) maps each experiment to its last job: id,
cluster, run folder, submitit log folder, argv, submission time, earlier job ids. An experiment's state:

- ``completed``: its run folder holds ``result.json`` (command steps: the files they create);
- ``pending`` / ``running`` / ``requeued`` ...: its job is alive in the scheduler (``squeue``), or a local job's
  process runs;
- ``failed``: its job ended without that (the job state, or the error submitit pickled, names why);
- ``unreadable``: its run folder holds a ``result.json`` that cannot be read (named, never taken for a run that
  has not finished; ``--retry-failed`` runs it again, resuming from its checkpoint);
- ``not submitted``: never launched under this root.

No torch, no submitit: ``--status`` and ``--dry-run`` use only this.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import os
import pickle
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pretrain.runtime.errors import SuiteError
from pretrain.runtime.io import atomic_write_json, read_json
from pretrain.runtime.result import RESULT, ResultError, read_result

__all__ = [
    "ACTIVE",
    "STATE_FILE",
    "JobState",
    "SweepState",
    "done_on_disk",
    "experiment_state",
    "result_problem",
    "headline",
    "job_state",
    "scheduler_states",
]

STATE_FILE = "sweep-state.json"
LOCK_FILE = ".sweep-state.lock"
SCHEMA = 1
# Scheduler states of a job that may still finish (SLURM's names, lower case; local jobs report "running").
ACTIVE = {"pending", "running", "requeued", "configuring", "completing", "suspended", "resizing", "requeue_hold",
          "requeue_fed", "stage_out", "signaling", "resv_del_hold", "stopped", "special_exit"}
COMPLETED, NOT_SUBMITTED, FAILED, UNREADABLE = "completed", "not submitted", "failed", "unreadable"


@dataclass(frozen=True)
class JobState:
    """The state of one experiment: ``state`` (see the module docstring), a ``detail`` (pending reason, why it
    failed), the scheduler's elapsed time if known."""

    state: str
    detail: str = ""
    elapsed: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def done(self) -> bool:
        return self.state == COMPLETED

    @property
    def failed(self) -> bool:
        return self.state not in ACTIVE and self.state not in (COMPLETED, NOT_SUBMITTED)


class SweepState:
    """The state file of a root. Use :meth:`locked` around a launch so two launchers never submit twice."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, STATE_FILE)
        self.experiments: dict[str, dict[str, Any]] = {}
        self.tables_job: dict[str, Any] = {}  # where the last launch writes the tables (and the SLURM job doing it)
        self.reload()

    def reload(self) -> None:
        if not os.path.exists(self.path):
            self.experiments, self.tables_job = {}, {}
            return
        try:
            data = read_json(self.path)
        except (OSError, ValueError) as error:
            raise SuiteError(f"cannot read the sweep state {self.path}: {error}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("experiments"),
                                                                                      dict):
            raise SuiteError(f"{self.path} is not a sweep state file of schema {SCHEMA}")
        self.experiments = data["experiments"]
        self.tables_job = data.get("tables_job") or {}

    def record(self, name: str, entry: Mapping[str, Any]) -> None:
        """Store ``name``'s new job (keeping earlier job ids in ``history``) and write the file atomically."""
        previous = self.experiments.get(name, {})
        history = list(previous.get("history", []))
        if previous.get("job_id"):
            history.append(previous["job_id"])
        submitted = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.experiments[name] = {**entry, "submitted": submitted, "history": history}
        self.save()

    def update(self, name: str, **fields: Any) -> None:
        """Change fields of ``name``'s entry (e.g. the outcome of a local job) and write the file."""
        self.experiments[name] = {**self.experiments[name], **fields}
        self.save()

    def save(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        atomic_write_json(self.path, {"schema": SCHEMA, "experiments": dict(sorted(self.experiments.items())),
                                      "tables_job": self.tables_job})

    @contextlib.contextmanager
    def locked(self) -> Iterator[SweepState]:
        """Hold ``ROOT/.sweep-state.lock`` (another launcher on the same root waits) and re-read the file."""
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, LOCK_FILE), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self.reload()
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str]) -> str | None:
    """stdout of ``command``, or None if it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def scheduler_states(job_ids: list[str]) -> dict[str, JobState]:
    """SLURM's view of ``job_ids``: ``squeue`` (live jobs and those finished in the last MinJobAge), then
    ``sacct`` for older ones where accounting exists. Jobs neither knows are absent."""
    if not job_ids:
        return {}
    states: dict[str, JobState] = {}
    out = _run(["squeue", "-h", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%M|%r"])
    for line in (out or "").splitlines():
        job, state, elapsed, reason = (line.split("|") + ["", "", ""])[:4]
        if job in job_ids:
            states[job] = JobState(state.lower(), "" if reason in ("None", "") else reason, elapsed)
    missing = [j for j in job_ids if j not in states]
    if missing:
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Elapsed", "-j", ",".join(missing)])
        for line in (out or "").splitlines():
            job, state, elapsed = (line.split("|") + ["", ""])[:3]
            if job in missing:
                states[job] = JobState(state.split()[0].lower() if state else "unknown", "", elapsed)
    return states


def _pickled_result(logs: str, job_id: str) -> tuple[str, Any] | None:
    """What submitit pickled at the end of job ``job_id`` (``("success", value)`` or ``("error", traceback)``)."""
    path = os.path.join(logs, f"{job_id}_0_result.pkl")
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None


def _error_line(traceback: str) -> str:
    lines = [line.strip() for line in str(traceback).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error"


def _local_alive(job_id: str) -> bool:
    try:
        with open(f"/proc/{int(job_id)}/cmdline", "rb") as handle:
            return b"submitit" in handle.read()
    except (OSError, ValueError):
        return False


def done_on_disk(stage: str, out: str, creates: list[str] | tuple[str, ...] = ()) -> bool:
    """A stage run folder with its ``result.json`` (of that stage), or a command step whose files all exist."""
    if stage == "command":
        return bool(creates) and all(os.path.exists(path) for path in creates)
    try:
        return read_result(os.path.join(out, RESULT)).stage == stage
    except ResultError:
        return False


def result_problem(stage: str, out: str) -> str:
    """Why the ``result.json`` in ``out`` is not a finished run of ``stage`` although it exists ("" when it is one,
    or when there is none)."""
    path = os.path.join(out, RESULT)
    if stage == "command" or not os.path.exists(path):
        return ""
    try:
        found = read_result(path).stage
    except ResultError as error:
        return str(error)
    return "" if found == stage else f"{path} is the result of a {found} run, not of {stage}"


def job_state(entry: Mapping[str, Any], live: Mapping[str, JobState]) -> JobState:
    """The state of the job in ``entry``: alive in the scheduler (or a running local process), ``finished``
    (submitit pickled a return value), or ``failed`` with the reason (the error submitit pickled, the outcome
    the launcher recorded, or SLURM's final state)."""
    job_id, cluster, elapsed = str(entry["job_id"]), entry.get("cluster", ""), entry.get("elapsed", "")
    job = live.get(job_id) if cluster == "slurm" else None
    if job and job.active:
        return job
    if cluster == "local" and _local_alive(job_id):
        return JobState("running")
    elapsed = job.elapsed if job else elapsed
    pickled = _pickled_result(entry.get("logs", ""), job_id)
    if pickled and pickled[0] == "error":
        return JobState(FAILED, _error_line(pickled[1]), elapsed)
    if pickled:
        return JobState("finished", "", elapsed)
    if entry.get("outcome"):
        return JobState(FAILED, str(entry["outcome"]), elapsed)
    if job:
        return JobState(FAILED, f"job {job.state}" + (f", {job.detail}" if job.detail else ""), elapsed)
    return JobState(FAILED, "ended without a result; no scheduler record left", elapsed)


def experiment_state(entry: Mapping[str, Any] | None, done: bool, live: Mapping[str, JobState],
                     problem: str = "") -> JobState:
    """The state of one experiment from the disk (``done``; ``problem``: :func:`result_problem`), its state-file
    ``entry`` and the scheduler's ``live`` states (:func:`scheduler_states`)."""
    if problem:
        job = job_state(entry, live) if entry and entry.get("job_id") else None
        return job if job and job.active else JobState(UNREADABLE, problem)
    if done:
        job = live.get(str(entry.get("job_id"))) if entry else None
        return JobState(COMPLETED, "", job.elapsed if job else (entry or {}).get("elapsed", ""))
    if not entry or not entry.get("job_id"):
        return JobState(NOT_SUBMITTED)
    job = job_state(entry, live)
    if job.state == "finished":
        return JobState(FAILED, "the job ended without the run's result", job.elapsed)
    return job


def headline(stage: str, out: str) -> str:
    """The run's headline number(s) from its ``result.json`` ("" when there is none)."""
    try:
        metrics = read_result(os.path.join(out, RESULT)).metrics
    except ResultError:
        return "unreadable result.json" if os.path.exists(os.path.join(out, RESULT)) else ""
    wanted = {"pretrain": [("loss", "loss_last_epoch", "{:.3f}")],
              "cls": [("top1", "top1", "{:.2f}")],
              "det": [("box AP", "bbox_AP", "{:.1f}"), ("mask AP", "segm_AP", "{:.1f}")]}.get(stage, [])
    parts = [f"{label} {fmt.format(metrics[key])}" for label, key, fmt in wanted
             if isinstance(metrics.get(key), (int, float))]
    return ", ".join(parts)
