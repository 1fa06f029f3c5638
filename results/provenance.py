"""Where each run of the tables started: its recipe or config and its starting weights, read from the sweep
definitions (``slurm/sweeps/*.yaml``), so that a table's notes say what the sweep actually runs.

``run_origins()`` maps every stage experiment's run folder to one line such as ``recipe rsb-a2, from random
initialisation`` or ``config mask_rcnn_R_50_FPN_1x, from r50-sup-d2/r50-sup.pkl (python -m downstream.convert detectron2
r50-sup-cls/model_best.pth, or --path supervised_resnet50=FILE)``. Weights made by a pretraining run name that
run's preset and the flags it adds. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from slurm.sweep import PLACEHOLDER, SWEEPS_DIR, Experiment, Sweep, load_sweep_file

__all__ = ["describe", "run_origins"]

CONFIG_FLAGS = ("--config", "--recipe", "--preset")
HIDDEN = {"--model", "--data", "--out", "--seed", "--coco-root", "--batch-size", "--workers", "--weights",
          *CONFIG_FLAGS}  # flags that say nothing about the comparison (or are said separately)


def _flag(args: Sequence[str], names: Sequence[str]) -> str:
    """The value of the last of ``names`` in ``args`` ("" when absent)."""
    value = ""
    for i, token in enumerate(args[:-1]):
        if token in names:
            value = args[i + 1]
    return value


def _extra_flags(args: Sequence[str]) -> list[str]:
    """``args`` without the flags in :data:`HIDDEN` and their values."""
    kept, skip = [], False
    for i, token in enumerate(args):
        if skip:
            skip = False
            continue
        if token in HIDDEN:
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        kept.append(token)
    return kept


def _text(token: str, exp: Experiment) -> str:
    """A sweep token in words: ``${run:NAME}`` -> NAME, a defaulted need -> its default or ``--path KEY=FILE``,
    another need -> its key in capitals."""
    fallbacks = dict(exp.fallbacks)

    def fill(match) -> str:
        key, arg = match.group(1), match.group(2)
        if key == "run":
            return arg
        if key in fallbacks:
            return f"{PLACEHOLDER.sub(fill, fallbacks[key])}, or --path {key}=FILE"
        return key.upper() if key not in ("out", "root") else exp.name if key == "out" else "ROOT"

    return PLACEHOLDER.sub(fill, token)


def _source(token: str, exp: Experiment, sweep: Sweep) -> str:
    """The starting weights ``token`` in words, following the command step or pretraining run that made them."""
    if token == "none":
        return "random initialisation"
    text = _text(token, exp)
    runs = [m.group(2) for m in PLACEHOLDER.finditer(token) if m.group(1) == "run"]
    maker = sweep.experiments.get(runs[0]) if runs else None
    if maker is None:
        return text
    if maker.stage == "command":
        inputs = [_text(t, maker) for t in maker.args if "${out}" not in t]
        return f"{text} (python -m {maker.module} {' '.join(inputs)})"
    if maker.stage == "pretrain":
        return f"{text} ({describe(maker, sweep)})"
    return text


def describe(exp: Experiment, sweep: Sweep) -> str:
    """One line: the experiment's recipe/config/preset, the other flags that set it apart, its starting weights."""
    config = _flag(exp.args, CONFIG_FLAGS)
    kind = {"pretrain": "SparK pretraining, preset", "cls": "recipe", "det": "config"}.get(exp.stage, exp.stage)
    parts = [f"{kind} {config}" if config else kind]
    extra = _extra_flags(exp.args)
    if extra:
        parts[0] += " " + " ".join(_text(t, exp) for t in extra)
    weights = _flag(exp.args, ("--weights",))
    if weights:
        parts.append(f"from {_source(weights, exp, sweep)}")
    return ", ".join(parts)


def run_origins() -> dict[str, str]:
    """Run folder -> :func:`describe` of its experiment, for every stage experiment of every file of
    ``slurm/sweeps`` but resources.yaml."""
    origins: dict[str, str] = {}
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        if path.stem == "resources":
            continue
        sweep = load_sweep_file(path)
        for exp in sweep.experiments.values():
            if exp.stage != "command":
                origins.setdefault(exp.name, describe(exp, sweep))
    return origins


def origins_of(runs: Mapping[str, Sequence[str]], origins: Mapping[str, str]) -> list[str]:
    """``source: origin`` for each source of a row whose run folders have a known origin (seeds share one)."""
    notes = []
    for source, folders in runs.items():
        found = list(dict.fromkeys(origins[f] for f in folders if f in origins))
        if found:
            notes.append(f"{source}: {'; '.join(found)}")
    return notes
