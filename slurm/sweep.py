"""Sweeps as data: experiments (a stage, the stage's own command-line flags, what it depends on) from YAML.

A sweep file (``slurm/sweeps/<name>.yaml``, or any path given to ``--sweep``)::

    description: what the sweep reproduces
    needs: {imagenet: "ImageNet root with train/ and val/"}      # paths the user gives (--imagenet DIR)
    # a need with a default: --path sup=FILE replaces it, else the default (which may name a run) fills it
    #   needs: {sup: {about: "supervised weights", default: "${run:r50-sup-cls}/model_best.pth"}}
    #   experiments: - {name: sup-file, stage: command, module: slurm.require, args: "${sup}", creates: ["${sup}"],
    #                   after: [r50-sup-cls]}     # done as soon as the file exists: the user's, or the run's
    defaults: {pretrain: "--preset paper --data ${imagenet}/train"}  # flags put before every stage's own
    resources: {pretrain: {nodes: 4}}                             # this sweep's changes to resources.yaml
    subsets: {table3: {tables: [3], description: ...}}            # named selections by table tag
    experiments:
      - name: r50-spark-pt                       # also its run folder: ROOT/r50-spark-pt
        stage: pretrain                          # pretrain | cls | det | command
        tables: [3, 4]                           # the paper tables it feeds (dry-run shows them)
        args: "--model resnet50"                 # the stage's own flags (python -m pretrain --help)
        seeds: [0, 1, 2]                         # optional: one run per seed, NAME-s0..., each with --seed N
      - name: r50-spark-d2
        stage: command                           # a plain ``python -m MODULE ARGS`` step (data, converters)
        module: downstream.convert
        args: "detectron2 ${run:r50-spark-pt}/encoder_timm.pth ${out}/backbone.pkl"
        creates: ["${out}/backbone.pkl"]         # done when these exist
        models: ["resnet50"]                     # optional: the architectures (globs) it applies to

Placeholders: ``${out}`` (this experiment's run folder), ``${run:NAME}`` (another experiment's run folder, which
makes NAME a dependency: SLURM ``afterok``), ``${root}``, and the sweep's ``needs``. A need with a ``default``
is filled by the default when its flag is not given; the ``${run:NAME}`` of a default is not a dependency by
itself (the user's file needs no run): an experiment using the need waits for NAME through ``after`` (directly or
through a step that ``creates`` the need's file and so counts as done when the user's file exists), which
loading checks.
Nothing here imports torch.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pretrain.runtime.errors import UsageError

__all__ = [
    "COMMAND",
    "SWEEPS_DIR",
    "STAGES",
    "Experiment",
    "Sweep",
    "SweepError",
    "apply_extra_args",
    "known_sweeps",
    "load_sweep",
    "needs_flag",
    "resolve_args",
    "unfilled",
    "run_folder",
]

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
STAGES = ("pretrain", "cls", "det")  # stages whose ``run(argv)`` a job calls in-process
COMMAND = "command"  # a ``python -m MODULE ARGS`` step run as a subprocess
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PLACEHOLDER = re.compile(r"\$\{([a-z_][a-z0-9_]*)(?::([^}]+))?\}")
EXPERIMENT_KEYS = {"name", "stage", "args", "module", "creates", "tables", "resources", "after", "note", "models",
                   "seeds"}
SWEEP_KEYS = {"description", "needs", "defaults", "resources", "subsets", "experiments"}


class SweepError(UsageError):
    """A sweep file or a selection that cannot be planned (one line naming the file and the problem)."""


@dataclass(frozen=True)
class Experiment:
    """One job of a sweep: ``stage`` run with ``args`` (placeholders unresolved) in the folder ROOT/``name``."""

    name: str
    stage: str
    args: tuple[str, ...] = ()
    module: str = ""  # command stage: the module run as ``python -m module args``
    creates: tuple[str, ...] = ()  # command stage: files whose existence means the step is done
    tables: tuple[str, ...] = ()
    resources: str = ""  # the resource kind (resources.yaml); empty: the stage's own
    after: tuple[str, ...] = ()  # every experiment this one waits for (explicit and from ${run:NAME})
    note: str = ""
    models: tuple[str, ...] = ()  # globs of the timm architectures it applies to (empty: any; Sweep.for_model)
    fallbacks: tuple[tuple[str, str], ...] = ()  # (need, default text) of the defaulted needs its tokens use

    @property
    def kind(self) -> str:
        """Resource kind of this experiment."""
        return self.resources or self.stage


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep: its experiments in file order, what paths it needs, resource changes, named subsets."""

    name: str
    path: str
    description: str
    experiments: dict[str, Experiment]
    needs: dict[str, str] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def order(self, names: Iterable[str] | None = None) -> list[Experiment]:
        """``names`` (default: all) in dependency order, ties in file order."""
        wanted = set(self.experiments if names is None else names)
        position = {name: i for i, name in enumerate(self.experiments)}
        done: list[Experiment] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            for parent in self.experiments[name].after:
                if parent in wanted:
                    visit(parent)
            done.append(self.experiments[name])

        for name in sorted(wanted, key=position.__getitem__):
            visit(name)
        return done

    def ancestors(self, name: str) -> set[str]:
        """Every experiment ``name`` waits for, directly or through others."""
        found: set[str] = set()
        stack = list(self.experiments[name].after)
        while stack:
            parent = stack.pop()
            if parent not in found:
                found.add(parent)
                stack.extend(self.experiments[parent].after)
        return found

    def select(self, stages: Sequence[str], only: Sequence[str] = ()) -> list[Experiment]:
        """Experiments of ``stages`` (and matching the ``only`` name globs, if any), plus the command steps they
        need (data, converters) and the command steps no stage experiment needs, in dependency order. Experiments
        of other stages they need are not included: the launcher finds them finished or running under the root,
        or reports the selection blocked."""
        needed_by_stages = {p for e in self.experiments.values() if e.stage != COMMAND for p in self.ancestors(e.name)}
        chosen = {name for name, exp in self.experiments.items()
                  if (exp.stage in stages or (exp.stage == COMMAND and name not in needed_by_stages))
                  and (not only or any(fnmatch.fnmatchcase(name, g) for g in only))}
        for name in list(chosen):
            chosen |= {p for p in self.ancestors(name) if self.experiments[p].stage == COMMAND}
        return self.order(chosen)

    def for_model(self, model: str) -> Sweep:
        """The experiments that apply to the timm architecture ``model`` (their ``models`` globs match it, or they
        name none). :class:`SweepError` if one of them depends on an experiment that does not apply."""
        kept = {n: e for n, e in self.experiments.items()
                if not e.models or any(fnmatch.fnmatchcase(model, g) for g in e.models)}
        for exp in kept.values():
            lost = [p for p in exp.after if p not in kept]
            if lost:
                raise SweepError(f"{self.path}: experiment {exp.name} applies to {model} but needs "
                                 f"{', '.join(lost)}, which does not")
        return replace(self, experiments=kept)

    def subset(self, subset: str) -> Sweep:
        """The experiments tagged with the subset's tables, plus everything they depend on."""
        spec = self.subsets[subset]
        tags = {str(t) for t in spec.get("tables", ())}
        tagged = {n for n, e in self.experiments.items() if tags & set(e.tables)}
        for name in list(tagged):
            tagged |= self.ancestors(name)
        experiments = {e.name: e for e in self.order(tagged)}
        description = spec.get("description", f"{self.description} (tables {', '.join(sorted(tags))})")
        return replace(self, name=subset, description=description, experiments=experiments)


def _split(value: Any, where: str) -> tuple[str, ...]:
    """Stage flags as a token tuple: a shell-quoted string or a list of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as error:
            raise SweepError(f"{where}: cannot split args {value!r}: {error}") from None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(str(v) for v in value)
    raise SweepError(f"{where}: args must be a string or a list of strings, got {value!r}")


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        return (str(value),)
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return tuple(str(v) for v in value)
    raise SweepError(f"{where}: {key} must be a string or a list of strings, got {value!r}")


def _references(tokens: Iterable[str]) -> list[str]:
    """Names of the ``${run:NAME}`` placeholders in ``tokens``."""
    return [m.group(2) for t in tokens for m in PLACEHOLDER.finditer(t) if m.group(1) == "run"]


def _experiment(raw: Any, index: int, defaults: Mapping[str, tuple[str, ...]], path: str,
                fallbacks: Mapping[str, str]) -> Experiment:
    where = f"{path}: experiment {index + 1}"
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping, got {raw!r}")
    unknown = set(raw) - EXPERIMENT_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(EXPERIMENT_KEYS)})")
    name = str(raw.get("name", ""))
    if not NAME.fullmatch(name):
        raise SweepError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it is a folder name)")
    where = f"{path}: experiment {name}"
    stage = raw.get("stage")
    if stage not in (*STAGES, COMMAND):
        raise SweepError(f"{where}: stage {stage!r} is not one of {', '.join((*STAGES, COMMAND))}")
    module = str(raw.get("module", ""))
    if (stage == COMMAND) != bool(module):
        raise SweepError(f"{where}: 'module' is required for stage command and only for it")
    args = defaults.get(stage, ()) + _split(raw.get("args"), where)
    creates = _strings(raw.get("creates"), where, "creates")
    after = list(_strings(raw.get("after"), where, "after"))
    used = {m.group(1): fallbacks[m.group(1)] for t in args + creates for m in PLACEHOLDER.finditer(t)
            if m.group(1) in fallbacks}
    after += [n for n in _references(args + creates) if n not in after]
    return Experiment(name=name, stage=stage, args=args, module=module, creates=creates,
                      tables=_strings(raw.get("tables"), where, "tables"), resources=str(raw.get("resources", "")),
                      after=tuple(after), note=str(raw.get("note", "")),
                      models=_strings(raw.get("models"), where, "models"), fallbacks=tuple(used.items()))


def _seeded(exp: Experiment, raw: Mapping[str, Any], path: str) -> list[Experiment]:
    """``exp`` once, or once per entry of its ``seeds`` (``NAME-sN`` with ``--seed N`` appended: a stage flag)."""
    if "seeds" not in raw:
        return [exp]
    seeds = raw["seeds"]
    if exp.stage == COMMAND or not isinstance(seeds, list) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: experiment {exp.name}: seeds must be a list of distinct integers >= 0 (and "
                         "only on a stage experiment)")
    return [replace(exp, name=f"{exp.name}-s{seed}", args=(*exp.args, "--seed", str(seed))) for seed in seeds]


def _needs(raw: Mapping[str, Any], path: str) -> tuple[dict[str, str], dict[str, str]]:
    """The sweep's ``needs``: key -> description, and key -> default for those that have one. A need is a
    description, or a mapping ``{about: description, default: text}`` (the default may use ``${run:NAME}``,
    ``${root}``, never another need)."""
    about, fallbacks = {}, {}
    for key, value in _mapping(raw, "needs", path).items():
        if isinstance(value, dict):
            unknown = set(value) - {"about", "default"}
            if unknown or not isinstance(value.get("default", ""), str):
                raise SweepError(f"{path}: needs.{key} is a description or {{about: TEXT, default: TEXT}}")
            nested = [m.group(1) for m in PLACEHOLDER.finditer(value.get("default", ""))
                      if m.group(1) not in ("run", "root")]
            if nested:
                raise SweepError(f"{path}: needs.{key}: a default may use ${{run:NAME}} and ${{root}}, not "
                                 f"${{{nested[0]}}}")
            about[str(key)] = str(value.get("about", ""))
            if value.get("default"):
                fallbacks[str(key)] = value["default"]
        else:
            about[str(key)] = str(value)
    return about, fallbacks


def _check_graph(experiments: Mapping[str, Experiment], path: str) -> None:
    for exp in experiments.values():
        for parent in exp.after:
            if parent not in experiments:
                raise SweepError(f"{path}: experiment {exp.name} depends on unknown experiment {parent!r}")
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise SweepError(f"{path}: dependency cycle {' -> '.join([*trail, name])}")
        state[name] = 1
        for parent in experiments[name].after:
            visit(parent, [*trail, name])
        state[name] = 2

    for name in experiments:
        visit(name, [])


def _check_fallbacks(sweep: Sweep) -> None:
    """Every run a used need default names is among the experiment's ancestors (it waits for it when the user
    gives no file)."""
    for exp in sweep.experiments.values():
        missing = [n for _, text in exp.fallbacks for n in _references([text]) if n not in sweep.ancestors(exp.name)]
        if missing:
            raise SweepError(f"{sweep.path}: experiment {exp.name} uses a need whose default is in the run folder of "
                             f"{missing[0]}, which it does not wait for (add after: [{missing[0]}], or after a step "
                             f"that creates the file)")


def _mapping(raw: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SweepError(f"{path}: '{key}' must be a mapping")
    return value


def load_sweep_file(path: str | os.PathLike, name: str | None = None) -> Sweep:
    """Load and check one sweep file."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except OSError as error:
        raise SweepError(f"cannot read sweep {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("experiments"), list):
        raise SweepError(f"{path}: a sweep is a mapping with a list 'experiments'")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(SWEEP_KEYS)})")
    defaults = {stage: _split(value, f"{path}: defaults.{stage}") for stage, value in _mapping(raw, "defaults",
                                                                                             path).items()}
    needs, fallbacks = _needs(raw, path)
    experiments: dict[str, Experiment] = {}
    for index, item in enumerate(raw["experiments"]):
        for exp in _seeded(_experiment(item, index, defaults, path, fallbacks), item, path):
            if exp.name in experiments:
                raise SweepError(f"{path}: experiment {exp.name} is defined twice (each experiment once)")
            experiments[exp.name] = exp
    _check_graph(experiments, path)
    for exp in experiments.values():
        for token in exp.args + exp.creates:
            for match in PLACEHOLDER.finditer(token):
                key = match.group(1)
                if key not in ("run", "out", "root") and key not in needs:
                    raise SweepError(f"{path}: experiment {exp.name} uses ${{{key}}}, which 'needs' does not "
                                     f"declare")
    sweep = Sweep(name=name or Path(path).stem, path=path, description=str(raw.get("description", "")).strip(),
                  experiments=experiments, needs=needs, resources=_mapping(raw, "resources", path),
                  subsets=_mapping(raw, "subsets", path))
    _check_fallbacks(sweep)
    return sweep


def known_sweeps() -> dict[str, str]:
    """Every sweep name ``--sweep`` accepts -> its description (files in ``slurm/sweeps`` and their subsets)."""
    names: dict[str, str] = {}
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        if path.stem == "resources":
            continue
        sweep = load_sweep_file(path)
        names[sweep.name] = sweep.description.splitlines()[0] if sweep.description else ""
        for subset, spec in sweep.subsets.items():
            names[subset] = str(spec.get("description", ""))
    return names


def load_sweep(name: str) -> Sweep:
    """A sweep by name (a file of ``slurm/sweeps``, or a subset such as ``table3`` of one) or by YAML path."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return load_sweep_file(name)
    candidate = SWEEPS_DIR / f"{name}.yaml"
    if candidate.is_file() and name != "resources":
        return load_sweep_file(candidate)
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        if path.stem == "resources":
            continue
        sweep = load_sweep_file(path)
        if name in sweep.subsets:
            return sweep.subset(name)
    raise SweepError(f"unknown sweep {name!r}; known: {', '.join(known_sweeps())} (or a path to a YAML file)")


def run_folder(root: str, name: str) -> str:
    """The run folder of experiment ``name`` under ``root``."""
    return os.path.join(root, name)


def needs_flag(key: str) -> str:
    """The launcher flag that fills the sweep's ``${key}``: ``--imagenet DIR``, ``--coco DIR``, ``--weights FILE``
    (an evaluation template's ``${weights}`` and ``${model}``), else ``--path KEY=DIR``."""
    if key in ("weights", "model"):
        return "--weights FILE"
    return f"--{key} DIR" if key in ("imagenet", "coco") else f"--path {key}=DIR"


def unfilled(tokens: Sequence[str]) -> list[str]:
    """The sweep ``needs`` keys still written as ``${key}`` in ``tokens`` (a dry run without their flags)."""
    return [m.group(1) for t in tokens for m in PLACEHOLDER.finditer(t) if m.group(1) not in ("run", "out", "root")]


def resolve_args(exp: Experiment, tokens: Sequence[str], root: str, values: Mapping[str, str | None],
                 missing_ok: bool = False) -> list[str]:
    """``tokens`` with the placeholders filled in. A missing value (``--imagenet`` not given) is the need's
    default if the sweep gives one, else a :class:`SweepError`, or left as ``${name}`` with ``missing_ok`` (a dry
    run)."""
    fallbacks = dict(exp.fallbacks)

    def fill(match: re.Match) -> str:
        key, arg = match.group(1), match.group(2)
        if key == "run":
            return run_folder(root, arg)
        if key == "out":
            return run_folder(root, exp.name)
        if key == "root":
            return root
        value = values.get(key)
        if value:
            return str(value).rstrip("/") if str(value) != "/" else "/"
        if key in fallbacks:
            return PLACEHOLDER.sub(fill, fallbacks[key])
        if missing_ok:
            return match.group(0)
        raise SweepError(f"experiment {exp.name} needs {needs_flag(key)} (the sweep's ${{{key}}})")

    return [PLACEHOLDER.sub(fill, token) for token in tokens]


def apply_extra_args(experiments: Mapping[str, Experiment], extras: Sequence[str]) -> dict[str, Experiment]:
    """Append flags to experiments: each extra is ``SELECTOR=ARGS`` where SELECTOR is a stage name or a glob of
    experiment names (``pretrain=--epochs 1``, ``tiny-det-*=SOLVER.MAX_ITER 4``). Later flags win in the
    stages' parsers, so this shortens or changes a sweep without editing its file."""
    updated = dict(experiments)
    for extra in extras:
        selector, sep, text = extra.partition("=")
        if not sep or not selector:
            raise SweepError(f"--extra-args {extra!r}: expected SELECTOR=ARGS (a stage or a name glob)")
        tokens = _split(text, f"--extra-args {selector}")
        matched = [n for n, e in updated.items() if e.stage == selector or fnmatch.fnmatchcase(n, selector)]
        if not matched:
            raise SweepError(f"--extra-args {selector!r} matches no experiment or stage of this sweep")
        for name in matched:
            updated[name] = replace(updated[name], args=updated[name].args + tokens)
    return updated
