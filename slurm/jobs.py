"""The submitit job of one experiment: runs a stage in-process and turns its stop signal into a requeue.

A :class:`StageJob` is a submitit checkpointable. Inside the job, the stage (``pretrain``, ``downstream.cls``,
``downstream.det.train``) runs through its ``run(argv) -> Outcome`` and listens to SIGTERM, SIGUSR1 and SIGUSR2
itself. When a time limit or a preemption comes, SLURM sends SIGUSR2 (submitit's preemption signal,
``--signal=USR2@delay``); the stage saves a checkpoint, restores the previous handlers (submitit's) and returns
``stopped``. The job then raises that signal again, so submitit's own handler runs: it calls :meth:`checkpoint`,
which returns this job with the stage's resume flag, and requeues it; the requeued job continues from the
checkpoint. A stop by any other signal (SIGTERM: cancelled, or killed by ``scontrol requeue``) ends the job as
failed, so ``afterok`` dependants never start from half-trained weights; a job that SLURM itself requeues
resumes because the run folder holds a checkpoint.

``command`` jobs run ``python -m MODULE ARGS`` steps (data generation, weight conversion, result tables).
Importing this module imports submitit, not torch: the stage loads when the job runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import submitit

from pretrain.runtime.errors import SuiteError

from .stages import STAGE_MODULES, JobSpec, stage_command
from .sweep import COMMAND

__all__ = ["JobError", "StageJob"]

logger = logging.getLogger("slurm.jobs")


class JobError(SuiteError):
    """A job that cannot finish: a stage error, a usage error, a failed command, or a stop without requeue."""


def _distributed_flags(spec: JobSpec) -> list[str]:
    """Detectron2 launch flags for a multi-GPU or multi-node ``per-node`` job, from submitit's environment."""
    if not spec.per_node or spec.nodes * spec.gpus_per_node <= 1:
        return []
    env = submitit.JobEnvironment()
    port = 20000 + int(str(env.job_id).split("_")[0]) % 20000
    return ["--num-gpus", str(spec.gpus_per_node), "--num-machines", str(env.num_nodes), "--machine-rank",
            str(env.node), "--dist-url", f"tcp://{env.hostnames[0]}:{port}"]


def _preemption_signal() -> signal.Signals:
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


class StageJob(submitit.helpers.Checkpointable):
    """One experiment as a submitit job (see the module docstring for the preemption protocol)."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        spec = self.spec
        os.makedirs(spec.out, exist_ok=True)
        if spec.stage == COMMAND:
            return self._run_command()
        argv = spec.stage_argv()
        argv[2:2] = _distributed_flags(spec)  # after --out DIR, before the sweep's flags
        print(f"[sweep] {spec.name}: {' '.join(spec.command_line()[:3])} {' '.join(argv)}", flush=True)
        outcome = self._run_stage(argv)
        if outcome.status == "completed":
            return {"status": "completed", "message": outcome.message, "out": spec.out}
        if outcome.status == "stopped":
            return self._stopped(outcome)
        raise JobError(f"{spec.name}: the stage returned {outcome.status!r} ({outcome.message})")

    def _run_stage(self, argv: Sequence[str]) -> Any:
        module = STAGE_MODULES[self.spec.stage]
        _use_allotted_cpus()
        try:
            return stage_command(self.spec.stage).run(list(argv))
        except SystemExit as exit_:  # the stage's parser rejected the flags; its message is on stderr
            raise JobError(f"{self.spec.name}: {module} rejected its arguments (exit code {exit_.code}); "
                           f"see this job's stderr") from None

    def _stopped(self, outcome: Any) -> dict[str, Any]:
        """Hand a stop by submitit's preemption signal to submitit's handler (checkpoint + requeue); any other
        stop ends the job as failed."""
        preempt = _preemption_signal()
        handler = signal.getsignal(preempt)
        if outcome.signal_name == preempt.name and callable(handler):
            print(f"[sweep] {self.spec.name}: {outcome.message}; handing {preempt.name} to submitit to requeue",
                  flush=True)
            signal.raise_signal(preempt)  # the main task exits inside the handler after requeueing
            return {"status": "stopped", "message": outcome.message, "out": self.spec.out}
        raise JobError(f"{self.spec.name}: {outcome.message} (this job ends as failed so that no afterok job "
                       f"starts; a SLURM requeue or a launch with --retry-failed resumes from the checkpoint)")

    def _run_command(self) -> dict[str, Any]:
        spec = self.spec
        if spec.creates and all(os.path.exists(path) for path in spec.creates):
            return {"status": "completed", "message": "already done", "out": spec.out}
        command = spec.command_line(sys.executable)
        print(f"[sweep] {spec.name}: {' '.join(command)}", flush=True)
        completed = subprocess.run(command, check=False, env={**os.environ, **_allotted_thread_env()})
        if completed.returncode != 0:
            raise JobError(f"{spec.name}: python -m {spec.module} failed with exit code {completed.returncode} (its "
                           f"message is in this job's stderr)")
        missing = [path for path in spec.creates if not os.path.exists(path)]
        if missing:
            raise JobError(f"{spec.name}: the command finished but did not create {', '.join(missing)}")
        return {"status": "completed", "message": "done", "out": spec.out}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out: requeue this job with the stage's resume flag."""
        return submitit.helpers.DelayedSubmission(type(self)(replace(self.spec, resume=True)))


def _allotted_thread_env() -> dict[str, str]:
    """``OMP_NUM_THREADS`` for the CPUs SLURM gave the task (``SLURM_CPUS_PER_TASK``), unless the user set it."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not cpus.isdigit() or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": cpus}


def _use_allotted_cpus() -> None:
    """Run torch's intra-op threads on the CPUs SLURM gave the task: where the node does not bind tasks to their
    CPUs, torch would start one thread per core of the node, and jobs sharing the node would oversubscribe it."""
    threads = _allotted_thread_env().get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
