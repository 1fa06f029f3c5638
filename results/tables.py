"""The paper's tables from ``result.json`` files: markdown and CSV, this run's number beside the paper's.

The tables are data (``results/paper.yaml``): each row names the run folders (under ``--root``) that fill it,
each column a ``result.json`` metric, and the paper's numbers sit beside them. A row may name several run folders
for one source (the seeds of one setting): its cell is their mean ± sample standard deviation, with the number of
finished runs. The notes say where each row's runs started (recipe and weights, from the sweep definitions:
:mod:`results.provenance`). Output is a pure function of the result files: running twice gives identical files.
Reads only JSON (no torch).
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.runtime.errors import SuiteError
from pretrain.runtime.result import RunResult, find_results

from .provenance import origins_of

__all__ = ["PAPER_FILE", "Cell", "Column", "Row", "TableSpec", "collect_runs", "fill", "load_specs", "mean_std",
           "render_csv", "render_markdown", "row_notes"]

PAPER_FILE = Path(__file__).resolve().parent / "paper.yaml"
DASH = "–"


@dataclass(frozen=True)
class Column:
    """A metric column (``metric`` from the row's ``source`` run) or a difference of two columns (``diff``)."""

    key: str
    label: str
    metric: str = ""
    source: str = ""
    digits: int = 1
    diff: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    """A table row: the runs that fill it (``source`` -> run folders: one, or the seeds of one setting), the paper's
    numbers per column key, a note; or the difference of two rows (``diff``: their labels)."""

    label: str
    runs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    note: str = ""
    diff: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableSpec:
    """One paper table: where it is written, its title, columns and rows."""

    id: str
    file: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    write: str = "always"  # or "when_run": only when one of the table's runs has finished
    models: tuple[str, ...] = ("*",)  # the architectures the table applies to (globs; results/evaluation.yaml)


@dataclass(frozen=True)
class Cell:
    """The paper's number, this run's number (None: no finished run; the mean over seeds) and the run folders it
    came from; ``std`` and ``n``: the sample standard deviation and count of the runs averaged (``n`` 0 for
    differences)."""

    paper: float | None = None
    value: float | None = None
    folders: tuple[str, ...] = ()
    std: float | None = None
    n: int = 0

    @property
    def folder(self) -> str:
        """The run folders, comma-separated (the CSV's ``run_folder``)."""
        return ", ".join(self.folders)

    @property
    def difference(self) -> float | None:
        return None if self.paper is None or self.value is None else self.value - self.paper


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _folders(runs: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """A row's ``runs`` with each source's run folders as a tuple (a single folder or a list of seeds)."""
    if not isinstance(runs, dict):
        raise TypeError(f"runs must be a mapping, got {runs!r}")
    return {str(k): (str(v),) if isinstance(v, str) else tuple(str(f) for f in v) for k, v in runs.items()}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of ``values``; (None, None) when empty, std None for one."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def load_specs(path: str | os.PathLike = PAPER_FILE) -> list[TableSpec]:
    """The table definitions of ``path``."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        specs = []
        for table in raw["tables"]:
            columns = tuple(Column(**{**c, "diff": tuple(c.get("diff", ()))}) for c in table["columns"])
            rows = tuple(Row(**{**r, "diff": tuple(r.get("diff", ())), "runs": _folders(r.get("runs", {}))})
                         for r in table["rows"])
            specs.append(TableSpec(table["id"], table["file"], table["title"], columns, rows,
                                   table.get("write", "always"), tuple(table.get("models", ("*",)))))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise SuiteError(f"cannot read the table definitions {path}: {' '.join(str(error).split())}") from None
    return specs


def collect_runs(root: str | os.PathLike, unreadable: list[str] | None = None) -> dict[str, RunResult]:
    """Every finished run under ``root``: run folder relative to ``root`` (``/``-separated) -> its result.
    ``unreadable`` (if given) receives one line per ``result.json`` that exists but cannot be read."""
    runs = {}
    for folder, result in find_results(root, unreadable):
        runs[Path(os.path.relpath(folder, root)).as_posix()] = result
    return runs


def _cell(row: Row, column: Column, runs: Mapping[str, RunResult]) -> Cell:
    paper = _number(row.paper.get(column.key))
    found = {}
    for folder in row.runs.get(column.source, ()):
        result = runs.get(folder)
        value = _number(result.metrics.get(column.metric)) if result else None
        if value is not None:
            found[folder] = value
    mean, std = mean_std(list(found.values()))
    return Cell(paper, mean, tuple(found), std, len(found))


def _minus(a: Cell, b: Cell) -> Cell:
    paper = None if a.paper is None or b.paper is None else a.paper - b.paper
    value = None if a.value is None or b.value is None else a.value - b.value
    return Cell(paper, value)


def fill(spec: TableSpec, runs: Mapping[str, RunResult]) -> list[list[Cell]]:
    """The cells of ``spec`` (rows x columns) from the finished ``runs``."""
    filled: dict[str, list[Cell]] = {}
    table = []
    for row in spec.rows:
        if row.diff:
            first, second = (filled[label] for label in row.diff)
            cells = [_minus(a, b) for a, b in zip(first, second)]
        else:
            by_key: dict[str, Cell] = {}
            for column in spec.columns:
                by_key[column.key] = (_minus(by_key[column.diff[0]], by_key[column.diff[1]]) if column.diff
                                      else _cell(row, column, runs))
            cells = [by_key[c.key] for c in spec.columns]
        filled[row.label] = cells
        table.append(cells)
    return table


def has_run(spec: TableSpec, runs: Mapping[str, RunResult]) -> bool:
    """Whether any run named by ``spec`` has finished."""
    return any(folder in runs for row in spec.rows for folders in row.runs.values() for folder in folders)


def has_seeds(spec: TableSpec) -> bool:
    """Whether a row of ``spec`` averages several runs for one source (its cells then say how many)."""
    return any(len(folders) > 1 for row in spec.rows for folders in row.runs.values())


def _fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return DASH
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return "0.0" if text in ("+0.0", "-0.0") and signed else text


def _markdown_cell(cell: Cell, column: Column, row: Row, seeds: bool = False) -> str:
    signed = bool(column.diff or row.diff)
    value = _fmt(cell.value, column.digits, signed)
    if seeds and cell.value is not None and not signed:
        spread = f" ± {_fmt(cell.std, column.digits)}" if cell.std is not None else ""
        value = f"{value}{spread} (n={cell.n})"
    if cell.paper is None:
        return value
    paper = _fmt(cell.paper, column.digits, signed)
    if cell.value is None:
        return f"{DASH} ({paper})"
    return f"{value} ({paper}; {_fmt(cell.difference, column.digits, True)})"


def row_notes(row: Row, origins: Mapping[str, str]) -> str:
    """The row's own note, then where its runs started (``source: recipe/config, from weights``)."""
    return "; ".join([*([row.note] if row.note else []), *origins_of(row.runs, origins)])


def render_markdown(specs: Sequence[TableSpec], runs: Mapping[str, RunResult], root: str,
                    origins: Mapping[str, str] | None = None) -> str:
    """One markdown file holding ``specs`` (the tables that share an output file); ``origins`` (run folder ->
    recipe and starting weights, :func:`results.provenance.run_origins`) go into the notes."""
    parts = [f"<!-- generated by `python -m results --root {root}`; edits are overwritten -->", ""]
    for spec in specs:
        cells = fill(spec, runs)
        seeds = has_seeds(spec)
        notes = [row_notes(row, origins or {}) for row in spec.rows]
        header = ["", *[c.label for c in spec.columns], "Run folders", *(["Notes"] if any(notes) else [])]
        legend = "Each cell: this run (paper; this run - paper)" if any(r.paper for r in spec.rows) else \
            "Each cell: this run's number"
        if seeds:
            legend += "; over seeds: mean ± sample std (n = finished runs); Δ rows: difference of the means"
        lines = [f"## {spec.title}", "", f"{legend}. {DASH}: no finished run under `{root}`.", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row, row_cells, note in zip(spec.rows, cells, notes):
            folders = sorted({f for c in row_cells for f in c.folders})
            line = [row.label, *[_markdown_cell(c, col, row, seeds) for c, col in zip(row_cells, spec.columns)],
                    ", ".join(folders) or DASH, *([note] if any(notes) else [])]
            lines.append("| " + " | ".join(line) + " |")
        parts += [*lines, ""]
    return "\n".join(parts)


def _csv_number(value: float | None) -> str:
    return "" if value is None else f"{round(value, 6):g}"


def render_csv(specs: Sequence[TableSpec], runs: Mapping[str, RunResult]) -> str:
    """Long-format CSV of ``specs``: one line per row and column, paper / this run / difference / run folder."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "row", "column", "metric", "paper", "this_run", "difference", "run_folder", "std", "n"])
    for spec in specs:
        for row, row_cells in zip(spec.rows, fill(spec, runs)):
            for column, cell in zip(spec.columns, row_cells):
                metric = column.metric or f"{column.diff[0]}-{column.diff[1]}"
                writer.writerow([spec.id, row.label, column.label, metric, _csv_number(cell.paper),
                                 _csv_number(cell.value), _csv_number(cell.difference), cell.folder,
                                 _csv_number(cell.std), cell.n or ""])
    return buffer.getvalue()
