"""Curves of finished runs: pretraining loss (``metrics.jsonl``, else ``result.json``'s ``epoch_losses``) and
fine-tuning top-1 (``result.json``'s ``curve``), one PNG each. Same inputs give byte-identical files."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pretrain.runtime.result import RunResult, read_metrics

from .tables import TableSpec, fill, has_seeds

__all__ = ["finetune_curve", "loss_curve", "plot_curves", "plot_seeded_tables"]

Curve = tuple[list[float], list[float]]


def loss_curve(folder: str, result: RunResult) -> Curve:
    """(epochs, loss) of a pretraining run: every logged step of ``metrics.jsonl`` (x in epochs, fractional
    inside an epoch), or the epoch means of ``result.json`` when there is no metrics file."""
    records = [r for r in read_metrics(folder) if isinstance(r.get("loss"), (int, float)) and "epoch" in r]
    steps_per_epoch = max((r.get("step_in_epoch", 0) for r in records), default=0)
    if records and steps_per_epoch:
        return ([r["epoch"] + r.get("step_in_epoch", 0) / steps_per_epoch for r in records],
                [float(r["loss"]) for r in records])
    losses = [float(v) for v in result.metrics.get("epoch_losses") or [] if isinstance(v, (int, float))]
    return [float(i) for i in range(1, len(losses) + 1)], losses


def finetune_curve(result: RunResult) -> Curve:
    """(epochs, top-1) of a fine-tuning run from ``result.json``'s ``curve``."""
    points = [p for p in result.metrics.get("curve") or [] if isinstance(p, dict)
              and isinstance(p.get("epoch"), (int, float)) and isinstance(p.get("top1"), (int, float))]
    return [float(p["epoch"]) for p in points], [float(p["top1"]) for p in points]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _save(plt, figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)


def plot_seeded_tables(specs: Sequence[TableSpec], runs: Mapping[str, RunResult], out: str) -> Sequence[str]:
    """``FILE.png`` for each table whose rows average seeds: per column, one bar per row at the mean with the
    sample std as error bar and the count under it (difference rows and columns left out); returns the paths."""
    written = []
    for spec in specs:
        if not has_seeds(spec):
            continue
        rows = [(row, cells) for row, cells in zip(spec.rows, fill(spec, runs)) if not row.diff]
        columns = [(i, c) for i, c in enumerate(spec.columns) if not c.diff]
        plt = _figure()
        figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=100)
        width = 0.8 / max(len(rows), 1)
        for r, (row, cells) in enumerate(rows):
            x = [k + (r - (len(rows) - 1) / 2) * width for k in range(len(columns))]
            means = [cells[i].value if cells[i].value is not None else 0.0 for i, _ in columns]
            stds = [cells[i].std or 0.0 for i, _ in columns]
            bars = axes.bar(x, means, width, yerr=stds, capsize=3, label=row.label)
            axes.bar_label(bars, labels=[f"n={cells[i].n}" for i, _ in columns], fontsize=7)
        axes.set_xticks(range(len(columns)), [c.label for _, c in columns])
        axes.set(title=f"{spec.file}.md: mean ± sample std over seeds (n: finished runs)", ylabel="mean ± std")
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(fontsize=7, loc="best")
        path = os.path.join(out, spec.file + ".png")
        _save(plt, figure, path)
        written.append(path)
    return written


def _plot(curves: Mapping[str, Curve], path: str, title: str, ylabel: str, log_y: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = _figure()

    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    for label in sorted(curves):
        x, y = curves[label]
        axes.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, linewidth=1.2, label=label)
    axes.set(title=title, xlabel="epoch", ylabel=ylabel)
    axes.set_xlim(left=0, right=max(max(x) for x, _ in curves.values()) * 1.02)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_y:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    _save(plt, figure, path)


def plot_curves(runs: Mapping[str, RunResult], root: str, out: str) -> Sequence[str]:
    """Write ``pretrain_loss.png`` and ``finetune_top1.png`` into ``out`` for the runs that have curves;
    returns the paths written."""
    losses = {name: loss_curve(os.path.join(root, name), r) for name, r in runs.items() if r.stage == "pretrain"}
    top1 = {name: finetune_curve(r) for name, r in runs.items() if r.stage == "cls"}
    written = []
    for curves, name, title, ylabel, log_y in (
            (losses, "pretrain_loss.png", "SparK pretraining loss", "loss (masked patches, normalised pixels)", True),
            (top1, "finetune_top1.png", "Fine-tuning accuracy", "top-1 (%)", False)):
        curves = {label: curve for label, curve in curves.items() if curve[0]}
        if curves:
            path = os.path.join(out, name)
            _plot(curves, path, title, ylabel, log_y)
            written.append(path)
    return written
