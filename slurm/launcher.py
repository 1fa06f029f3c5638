"""``python slurm/launch_all.py``: plan a sweep as a job graph, submit it through submitit, report its state.

The plan of a launch is a list of :class:`Step` in dependency order, one per selected experiment, each with an
action: ``submit``, or ``skip`` (finished, already queued or running, failed without ``--retry-failed``), or
``blocked`` (it needs an experiment that is neither finished, queued, nor part of this launch). On SLURM every
job is submitted at once with ``afterok`` dependencies on the jobs it needs, followed by a job that writes the
result tables (``afterany``); locally (submitit's local or debug executor) the steps run one after another and
the tables are written at the end. Planning, ``--dry-run`` and ``--status`` import neither torch nor submitit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pretrain.runtime.cli import ArgumentParser, one_line, run_cli
from pretrain.runtime.errors import SuiteError, UsageError
from pretrain.runtime.stage import RunTarget

from .resources import Resources, ResourceTable, load_resources
from .stages import JobSpec, stage_command
from .state import (
    FAILED,
    NOT_SUBMITTED,
    JobState,
    SweepState,
    done_on_disk,
    experiment_state,
    headline,
    job_state,
    result_problem,
    scheduler_states,
)
from .sweep import (
    COMMAND,
    STAGES,
    Experiment,
    Sweep,
    apply_extra_args,
    known_sweeps,
    load_sweep,
    needs_flag,
    resolve_args,
    run_folder,
    unfilled,
)

__all__ = ["Step", "build_parser", "evaluation_sweep", "main", "make_plan", "resolved_on_ranks", "unfilled_warnings"]

PROG = "python slurm/launch_all.py"
TABLES = "tables"  # the default folder of the result tables under --root
CLUSTERS = ("auto", "slurm", "local", "debug")
TABLES_JOB = "sweep-tables"
EVALUATE = ("evaluate", "evaluate-tiny")  # the templates of --weights: with --imagenet/--coco, and on the demo data
LOGS = "logs"  # submitit's folder inside each run folder: <job id>_0_log.out/.err, the job pickles
SHAPE_FLAGS = {"nodes": int, "gpus_per_node": int, "cpus_per_task": int, "mem_gb": float, "timeout_min": int}
CLUSTER_FLAGS = ("partition", "account", "qos", "constraint", "exclude")


@dataclass(frozen=True)
class Step:
    """One experiment of a launch: the resolved job, its resources, its state before the launch and what the
    launch does with it (``submit``, ``skip`` or ``blocked``, with the ``reason``); ``parents``: the experiments
    it must wait for (queued, running or submitted by this launch)."""

    exp: Experiment
    spec: JobSpec
    resources: Resources
    state: JobState
    action: str
    reason: str = ""
    parents: tuple[str, ...] = ()


def _values(args: argparse.Namespace) -> dict[str, str]:
    """The sweep's ``needs`` given on the command line (``--imagenet``, ``--coco``, ``--path KEY=DIR``)."""
    values = {"imagenet": args.imagenet, "coco": args.coco}
    for item in args.path:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"--path {item!r}: expected KEY=DIR")
        values[key] = value
    return {k: os.path.abspath(v) for k, v in values.items() if v}


def _spec(exp: Experiment, root: str, values: Mapping[str, str], resources: Resources, missing_ok: bool) -> JobSpec:
    argv = resolve_args(exp, exp.args, root, values, missing_ok)
    creates = resolve_args(exp, exp.creates, root, values, missing_ok)
    return JobSpec(name=exp.name, stage=exp.stage, argv=tuple(argv), out=run_folder(root, exp.name),
                   module=exp.module, creates=tuple(creates), nodes=resources.nodes,
                   gpus_per_node=resources.gpus_per_node, per_node=resources.tasks == "per-node")


def _state_of(spec: JobSpec, state: SweepState, live: Mapping[str, JobState]) -> JobState:
    done = done_on_disk(spec.stage, spec.out, spec.creates)
    return experiment_state(state.experiments.get(spec.name), done, live, result_problem(spec.stage, spec.out))


def make_plan(sweep: Sweep, selected: Sequence[Experiment], root: str, values: Mapping[str, str],
              resources: ResourceTable, state: SweepState, live: Mapping[str, JobState], retry_failed: bool = False,
              missing_ok: bool = False) -> list[Step]:
    """The steps of launching ``selected`` (in dependency order) under ``root`` given what already exists."""
    steps: dict[str, Step] = {}
    outside: dict[str, JobState] = {}

    def state_of_parent(name: str) -> tuple[JobState, str]:
        """(state, action) of an experiment this launch may wait for."""
        if name in steps:
            return steps[name].state, steps[name].action
        if name not in outside:
            exp = sweep.experiments[name]
            outside[name] = _state_of(_spec(exp, root, values, resources.get(exp.kind), True), state, live)
        return outside[name], "outside"

    for exp in selected:
        res = resources.get(exp.kind)
        spec = _spec(exp, root, values, res, missing_ok)
        current = _state_of(spec, state, live)
        job = state.experiments.get(exp.name, {}).get("job_id", "")
        if current.done:
            steps[exp.name] = Step(exp, spec, res, current, "skip", "completed")
            continue
        if current.active:
            steps[exp.name] = Step(exp, spec, res, current, "skip", f"{current.state} as job {job}")
            continue
        if current.failed and not retry_failed:
            reason = (f"{current.state}: {current.detail}" if not job or current.state != FAILED else
                      f"failed as job {job} ({current.detail})") + "; --retry-failed resubmits"
            steps[exp.name] = Step(exp, spec, res, current, "skip", reason)
            continue
        parents, blockers = [], []
        for parent in exp.after:
            parent_state, action = state_of_parent(parent)
            if parent_state.done:
                continue
            if parent_state.active or action == "submit":
                parents.append(parent)
            elif action == "outside":
                hint = f"; launch its stage ({sweep.experiments[parent].stage})" if not parent_state.failed else ""
                blockers.append(f"{parent} ({parent_state.state}{hint})")
            else:
                detail = "" if parent_state.state == NOT_SUBMITTED else ", not submitted"
                blockers.append(f"{parent} ({parent_state.state}{detail})")
        if blockers:
            steps[exp.name] = Step(exp, spec, res, current, "blocked", "needs " + ", ".join(blockers))
        else:
            steps[exp.name] = Step(exp, spec, res, current, "submit", "", tuple(parents))
    return list(steps.values())


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (headers, *rows)]
    return "\n".join(lines)


def resolved_on_ranks(spec: JobSpec, res: Resources) -> str:
    """How the stage resolves a job's config on the ranks its resources give (global batch, accumulation, SyncBN,
    lr: the stage's own summary), or why it cannot; "" for command steps. Imports no torch."""
    if spec.stage not in STAGES:
        return ""
    ranks = res.nodes * (res.gpus_per_node if res.tasks == "per-node" and res.gpus_per_node else res.tasks_per_node)
    target = RunTarget(ranks, "cuda" if res.gpus_per_node else "cpu")
    command = stage_command(spec.stage)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            cfg = command.plan(["--out", spec.out, *spec.argv], target)
    except SystemExit:
        return f"flags rejected: {one_line(errors.getvalue())}"
    except UsageError as error:
        return f"cannot resolve: {one_line(error)}"
    return f"on {ranks} {target.device} rank(s): {command.summary(cfg)}"


def unfilled_warnings(steps: Sequence[Step]) -> list[str]:
    """One warning per sweep placeholder a dry run left unfilled, naming the flag that fills it."""
    keys = dict.fromkeys(k for s in steps for k in unfilled([*s.spec.argv, *s.spec.creates]))
    return [f"warning: ${{{key}}} is not filled in: pass {needs_flag(key)} (a launch without it refuses)"
            for key in keys]


def render_plan(sweep: Sweep, steps: Sequence[Step], root: str, cluster: str) -> str:
    """The job graph of a dry run: one line per experiment, then its command and, for stage jobs, its config as
    resolved on the job's ranks."""
    rows, commands = [], []
    for i, step in enumerate(steps, 1):
        after = ", ".join(step.parents) or ("-" if step.action == "submit" else "")
        rows.append([str(i), step.exp.name, step.exp.stage, ",".join(step.exp.tables) or "-",
                     step.action if not step.reason else f"{step.action}: {step.reason}", after,
                     step.resources.describe()])
        commands.append(f"{i:>3}  {' '.join(step.spec.command_line())}")
        resolved = resolved_on_ranks(step.spec, step.resources)
        if resolved:
            commands.append(f"     {resolved}")
    tables = sorted({t for s in steps for t in s.exp.tables}, key=lambda t: (len(t), t))
    head = [f"sweep {sweep.name}: {len(steps)} experiments"
            + (f" (tables {', '.join(tables)})" if tables else "") + f" under {root}; cluster: {cluster}",
            "dry run: nothing submitted"]
    submit = sum(s.action == "submit" for s in steps)
    summary = f"{submit} to submit, {sum(s.action == 'skip' for s in steps)} skipped, " \
              f"{sum(s.action == 'blocked' for s in steps)} blocked"
    graph = _format_table(["#", "experiment", "stage", "tables", "action", "after (afterok)", "resources"], rows)
    return "\n".join([*head, "", graph, "", "commands:", *commands, "", summary])


def _elapsed(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _log(entry: Mapping[str, Any], root: str) -> str:
    if not entry.get("job_id"):
        return ""
    return os.path.relpath(os.path.join(entry["logs"], f"{entry['job_id']}_0_log.out"), root)


def _live(state: SweepState) -> dict[str, JobState]:
    ids = [str(e["job_id"]) for e in [*state.experiments.values(), state.tables_job]
           if e and e.get("cluster") == "slurm" and e.get("job_id")]
    return scheduler_states(ids)


Row = tuple[str, str, str, tuple[str, ...]]  # experiment, stage, run folder, files a command step creates


def collect_states(state: SweepState, rows: Sequence[Row]) -> list[JobState]:
    """The state of each row's experiment (one scheduler query for all)."""
    live = _live(state)
    return [experiment_state(state.experiments.get(name), done_on_disk(stage, out, creates), live,
                             result_problem(stage, out)) for name, stage, out, creates in rows]


def render_status(state: SweepState, rows: Sequence[Row], states: Sequence[JobState], tables: str | None) -> str:
    """``--status``: experiment, stage, state, job id, elapsed, log, headline result; then where the tables are."""
    lines = []
    for (name, stage, out, _), current in zip(rows, states):
        entry = state.experiments.get(name, {})
        label = current.state + (f" ({current.detail})" if current.detail else "")
        lines.append([name, stage, label, str(entry.get("job_id", "")), current.elapsed or "", _log(entry, state.root),
                      headline(stage, out) if stage in STAGES else ""])
    text = _format_table(["experiment", "stage", "state", "job", "elapsed", "log", "result"], lines)
    counts: dict[str, int] = {}
    for current in states:
        counts[current.state] = counts.get(current.state, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    last = ""
    if state.tables_job.get("job_id"):
        job = job_state(state.tables_job, _live(state))
        last = f"; last table job {state.tables_job['job_id']}: {job.state}" + (f" ({job.detail})" if job.detail
                                                                                 else "")
    where = (f"tables: {tables} (python -m results --root {state.root} --out {tables} regenerates them){last}"
             if tables else f"tables: none recorded; python -m results --root {state.root} --out DIR writes them")
    return f"{text}\n\n{summary}\n{where}"


def _status_rows(state: SweepState, sweep: Sweep | None, root: str, values: Mapping[str, str],
                 resources: ResourceTable) -> list[Row]:
    rows: dict[str, Row] = {}
    for exp in (sweep.order() if sweep else []):
        spec = _spec(exp, root, values, resources.get(exp.kind), True)
        rows[exp.name] = (exp.name, exp.stage, spec.out, spec.creates)
    for name, entry in state.experiments.items():
        rows.setdefault(name, (name, entry.get("stage", ""), entry.get("out", ""), tuple(entry.get("creates", ()))))
    return list(rows.values())


def slurm_available() -> bool:
    """Whether ``sbatch`` exists and the controller answers (``sinfo``)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=20,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_cluster(requested: str) -> str:
    """``auto``: SLURM when ``sbatch`` works, otherwise submitit's local executor."""
    if requested == "auto":
        return "slurm" if slurm_available() else "local"
    if requested == "slurm" and not slurm_available():
        raise SuiteError("--cluster slurm: sbatch/sinfo do not reach a SLURM controller (slurm/local_cluster.sh up "
                         "starts one on this machine)")
    return requested


def _executor(cluster: str, spec: JobSpec, res: Resources, options: Mapping[str, str], after: Sequence[str]) -> Any:
    """A submitit executor for one job: its folder, resources, cluster options and ``afterok`` dependencies."""
    import submitit

    logs = os.path.join(spec.out, LOGS)
    executor = submitit.AutoExecutor(folder=logs, cluster=cluster, **{f"{cluster}_max_num_timeout": res.max_num_timeout}
                                     if cluster in ("slurm", "local") else {})
    params: dict[str, Any] = {"name": f"spark-{spec.name}", "timeout_min": res.timeout_min, "nodes": res.nodes,
                              "tasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task,
                              "mem_gb": res.mem_gb}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if cluster == "slurm":
        params.update({f"slurm_{k}": v for k, v in options.items() if v})
        params["slurm_signal_delay_s"] = res.signal_delay_s
        extra = {"kill-on-invalid-dep": "yes"}
        if after:
            extra["dependency"] = after[0] if after[0].startswith("after") else "afterok:" + ":".join(after)
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def _entry(step: Step, cluster: str, job_id: str, sweep: str) -> dict[str, Any]:
    spec = step.spec
    return {"job_id": job_id, "cluster": cluster, "stage": spec.stage, "sweep": sweep, "out": spec.out,
            "logs": os.path.join(spec.out, LOGS), "argv": list(spec.argv), "creates": list(spec.creates)}


def _tables_spec(root: str, tables: str, model: str | None = None) -> JobSpec:
    """The job writing the result tables: the paper's (``python -m results``), or with ``model`` (a checkpoint
    evaluation) that checkpoint's against the paper's row (``python -m results.evaluation``)."""
    extra, module = (("--model", model), "results.evaluation") if model else ((), "results")
    return JobSpec(name=TABLES_JOB, stage=COMMAND, argv=("--root", root, "--out", tables, *extra),
                   out=os.path.join(root, TABLES_JOB), module=module)


def submit_slurm(steps: Sequence[Step], state: SweepState, sweep: str, options: Mapping[str, str],
                 resources: ResourceTable, tables: str | None, model: str | None = None) -> list[str]:
    """Submit every ``submit`` step with ``afterok`` on its parents' jobs, then the tables job (``afterany``; with
    ``model``, the table of a checkpoint evaluation)."""
    from .jobs import StageJob

    job_ids = {name: str(entry["job_id"]) for name, entry in state.experiments.items() if entry.get("job_id")}
    submitted = []
    for step in steps:
        if step.action != "submit":
            continue
        after = [job_ids[p] for p in step.parents]
        job = _executor("slurm", step.spec, step.resources, options, after).submit(StageJob(step.spec))
        job_ids[step.exp.name] = str(job.job_id)
        state.record(step.exp.name, _entry(step, "slurm", str(job.job_id), sweep))
        submitted.append(str(job.job_id))
        print(f"submitted {step.exp.name}: job {job.job_id}" + (f" (afterok {', '.join(after)})" if after else ""))
    waiting = [job_ids[s.exp.name] for s in steps if s.action == "submit" or s.state.active]
    if submitted and tables:
        spec = _tables_spec(state.root, tables, model)
        job = _executor("slurm", spec, resources.get(COMMAND), options,
                        ["afterany:" + ":".join(waiting)]).submit(StageJob(spec))
        state.tables_job = {"job_id": str(job.job_id), "cluster": "slurm", "logs": os.path.join(spec.out, LOGS),
                            "tables": tables}
        state.save()
        print(f"submitted the result tables: job {job.job_id} (afterany: every job of this sweep) -> {tables}")
    return waiting


def run_serial(steps: Sequence[Step], state: SweepState, sweep: str, cluster: str, options: Mapping[str, str]) -> int:
    """Run the ``submit`` steps one after another with submitit's local or debug executor; a failure blocks only
    the steps that need it. Returns the number of failed steps."""
    from .jobs import StageJob

    failed: set[str] = set()
    for step in steps:
        if step.action != "submit":
            continue
        blockers = [p for p in step.parents if p in failed]
        if blockers:
            print(f"blocked {step.exp.name}: needs {', '.join(blockers)} (failed)")
            failed.add(step.exp.name)
            continue
        start = time.time()
        job = _executor(cluster, step.spec, step.resources, options, ()).submit(StageJob(step.spec))
        state.record(step.exp.name, _entry(step, cluster, str(job.job_id), sweep))
        print(f"running {step.exp.name} ({cluster} job {job.job_id}; log {state.experiments[step.exp.name]['logs']})",
              flush=True)
        try:
            job.result()
            outcome = ""
        except Exception as error:  # submitit raises FailedJobError/UncompletedJobError with the job's traceback
            outcome = one_line(str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
            failed.add(step.exp.name)
            print(f"failed {step.exp.name}: {outcome}")
        state.update(step.exp.name, outcome=outcome, elapsed=_elapsed(time.time() - start))
    return len(failed)


def wait_for(job_ids: Sequence[str], poll_s: float) -> None:
    """Poll SLURM until none of ``job_ids`` is queued or running."""
    while True:
        live = scheduler_states(list(job_ids))
        active = [j for j in job_ids if j in live and live[j].active]
        if not active:
            return
        time.sleep(poll_s)


def write_tables(root: str, tables: str, model: str | None = None) -> None:
    """Regenerate the result tables in this process (``python -m results``, or ``results.evaluation`` for a
    checkpoint evaluation of ``model``; no torch)."""
    from results.__main__ import main as paper_tables
    from results.evaluation import main as evaluation_table

    if (evaluation_table if model else paper_tables)(list(_tables_spec(root, tables, model).argv)) != 0:
        raise SuiteError(f"writing the result tables into {tables} failed")


def evaluation_sweep(weights: str, model: str | None, name: str | None, values: dict[str, str]) -> Sweep:
    """The evaluation template (``name``, default :data:`EVALUATE`'s by whether data paths were given) narrowed to
    the checkpoint's architecture; fills ``values['weights']`` and ``values['model']`` (read from the file when
    ``model`` is None). :class:`SuiteError` for a missing or unreadable file, :class:`UsageError` for an
    architecture the template has no experiment for."""
    path = os.path.abspath(weights)
    if not os.path.exists(path):
        raise SuiteError(f"--weights file not found: {weights}")
    if not model:
        from pretrain.weights import read_weights

        model = read_weights(path).model_name
    sweep = load_sweep(name or EVALUATE[0 if values else 1]).for_model(model)
    if not any(e.stage != COMMAND for e in sweep.experiments.values()):
        raise UsageError(f"sweep {sweep.name} has no experiment for architecture {model}")
    values.update(weights=path, model=model)
    return sweep


def _stages(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if parts == ("all",):
        return STAGES
    unknown = [p for p in parts if p not in STAGES]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or text!r}; choose from "
                                         f"{', '.join(STAGES)} (comma-separated) or all")
    return parts


def build_parser() -> ArgumentParser:
    """The launcher's command line."""
    parser = ArgumentParser(
        prog=PROG,
        description="Launch a SparK sweep (slurm/sweeps/*.yaml) as submitit jobs: SLURM with afterok dependencies, "
                    "or one after another on this machine. Re-running is idempotent: finished experiments are "
                    "skipped, queued or running ones are not submitted twice (ROOT/sweep-state.json). Preempted or "
                    "timed-out jobs save, are requeued and resume. Writes the result tables at the end.",
    )
    parser.add_argument("--stage", type=_stages, default=STAGES, metavar="STAGES",
                        help="comma-separated stages to launch: pretrain,cls,det (default all); data and "
                             "conversion steps they need come along; a later --stage cls,det finds finished "
                             "pretraining runs under --root")
    sweeps = ", ".join(known_sweeps())
    parser.add_argument("--sweep", help=f"sweep name ({sweeps}) or a YAML file; default: paper when --imagenet or "
                                        f"--coco is given, else tiny (the embedded demo)")
    parser.add_argument("--cluster", choices=CLUSTERS, default="auto",
                        help="auto: SLURM when sbatch works, else local; local: submitit's local executor, one job "
                             "at a time; debug: in this process (submitit's debug executor) [auto]")
    parser.add_argument("--root", default="runs", help="folder of the run folders and the state file [runs]")
    parser.add_argument("--imagenet", help="ImageNet root with train/ and val/ (the paper sweeps' ${imagenet})")
    parser.add_argument("--coco", help="COCO root with annotations/, train2017/, val2017/ (the sweeps' ${coco})")
    parser.add_argument("--path", action="append", default=[], metavar="KEY=DIR",
                        help="any other path a sweep needs (${KEY}); repeatable")
    parser.add_argument("--weights", metavar="FILE",
                        help="evaluate this checkpoint: the downstream experiments of its architecture's table rows "
                             "(slurm/sweeps/evaluate.yaml with --imagenet/--coco, else evaluate-tiny.yaml on the "
                             "demo data); use one --root per checkpoint")
    parser.add_argument("--model", metavar="NAME",
                        help="with --weights: the checkpoint's timm architecture (default: read from the file)")
    parser.add_argument("--only", type=lambda t: tuple(x for x in t.split(",") if x), default=(), metavar="GLOBS",
                        help="launch only experiments whose names match these comma-separated globs")
    parser.add_argument("--extra-args", action="append", default=[], metavar="SELECTOR=ARGS",
                        help="append stage flags to a stage's or a name glob's experiments, e.g. "
                             "'pretrain=--epochs 1' or 'tiny-det-*=SOLVER.MAX_ITER 4'; repeatable")
    group = parser.add_argument_group("resources (defaults: slurm/sweeps/resources.yaml, changed by the sweep)")
    for flag in CLUSTER_FLAGS:
        group.add_argument(f"--{flag}", help=f"SLURM --{flag} of every job")
    for field, kind in SHAPE_FLAGS.items():
        flag = "--time-min" if field == "timeout_min" else f"--{field.replace('_', '-')}"
        group.add_argument(flag, dest=field, type=kind, help=f"{field} of every compute job (pretrain, cls, det)")
    group.add_argument("--resources", action="append", default=[], metavar="KIND.FIELD=VALUE",
                       help="one field of one job kind, e.g. pretrain.timeout_min=600; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the job graph and the commands; submit nothing")
    parser.add_argument("--status", action="store_true",
                        help="print every experiment's state, job id, elapsed time, log and headline result")
    parser.add_argument("--retry-failed", action="store_true", help="resubmit experiments whose job failed")
    parser.add_argument("--wait", action="store_true", help="on SLURM, wait until the launched jobs end, then report")
    parser.add_argument("--poll-s", type=float, default=10.0, help="seconds between queue checks with --wait [10]")
    parser.add_argument("--tables-out", metavar="DIR",
                        help=f"folder of the result tables [ROOT/{TABLES}; --status: where the last launch wrote them]")
    parser.add_argument("--no-tables", action="store_true", help="do not write the result tables at the end")
    return parser


def _launch(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.root)
    values = _values(args)
    state = SweepState(root)
    tables = None if args.no_tables else os.path.abspath(args.tables_out or os.path.join(root, TABLES))
    shape = {field: getattr(args, field) for field in SHAPE_FLAGS}
    if args.status:
        sweep = load_sweep(args.sweep) if args.sweep else None
        resources = load_resources(sweep.resources if sweep else None, shape, args.resources)
        rows = _status_rows(state, sweep, root, values, resources)
        if not rows:
            print(f"nothing launched under {root} yet (no {state.path})")
            return 0
        shown = os.path.abspath(args.tables_out) if args.tables_out else state.tables_job.get("tables")
        print(render_status(state, rows, collect_states(state, rows), shown))
        return 0
    evaluated = None  # the architecture of a checkpoint evaluation (its own table)
    if args.weights:
        sweep = evaluation_sweep(args.weights, args.model, args.sweep, values)
        evaluated = values["model"]
    elif args.model:
        raise UsageError("--model names the architecture of --weights FILE; give the file too")
    else:
        sweep = load_sweep(args.sweep or ("paper" if values else "tiny"))
    sweep = replace(sweep, experiments=apply_extra_args(sweep.experiments, args.extra_args))
    selected = sweep.select(args.stage, args.only)
    if not selected:
        raise UsageError(f"sweep {sweep.name} has no experiment of stage(s) {','.join(args.stage)}"
                         + (f" matching {','.join(args.only)}" if args.only else ""))
    resources = load_resources(sweep.resources, shape, args.resources)
    options = {flag: getattr(args, flag) for flag in CLUSTER_FLAGS}
    if args.dry_run:
        steps = make_plan(sweep, selected, root, values, resources, state, _live(state), args.retry_failed, True)
        cluster = args.cluster if args.cluster != "auto" else "auto (" + ("slurm" if slurm_available() else "local") \
            + ")"
        print(render_plan(sweep, steps, root, cluster))
        for warning in unfilled_warnings(steps):
            print(f"{PROG}: {warning}", file=sys.stderr)
        return 0
    cluster = choose_cluster(args.cluster)
    with state.locked():
        steps = make_plan(sweep, selected, root, values, resources, state, _live(state), args.retry_failed)
        for step in steps:
            if step.action != "submit":
                print(f"{step.action} {step.exp.name}: {step.reason}")
        if cluster == "slurm":
            waiting = submit_slurm(steps, state, sweep.name, options, resources, tables, evaluated)
            failures = 0
        else:
            failures = run_serial(steps, state, sweep.name, cluster, options)
            if tables:
                write_tables(root, tables, evaluated)
                state.tables_job = {"tables": tables}
                state.save()
    if cluster == "slurm" and args.wait and waiting:
        print(f"waiting for {len(waiting)} job(s)...", flush=True)
        wait_for([*waiting, *([state.tables_job["job_id"]] if state.tables_job.get("job_id") else [])], args.poll_s)
    if cluster != "slurm" or args.wait:
        state.reload()
        rows = _status_rows(state, replace(sweep, experiments={e.name: e for e in selected}), root, values, resources)
        states = collect_states(state, rows)
        print(render_status(state, rows, states, tables))
        failures = sum(s.failed for s in states)
    elif not any(s.action == "submit" for s in steps):
        print("nothing to submit")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``python slurm/launch_all.py``, ``python -m slurm``, ``spark-sweep``): exit 0 on success, 1 when
    a job failed or a runtime error, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _launch(args))


if __name__ == "__main__":
    sys.exit(main())
