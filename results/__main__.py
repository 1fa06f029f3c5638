"""``python -m results [--root runs] [--out ROOT/tables]``: the paper's tables and curves from every ``result.json``.

Writes ``table1.md`` (tables 1 and 2), ``table3.md``, ``table4.md``, ``table5.md`` always, ``table6.md`` when a
linear probe has finished and ``tiny.md`` when a run of the tiny sweep has, each with a CSV beside it,
``pretrain_loss.png`` / ``finetune_top1.png`` when there are curves, and ``FILE.png`` beside a table whose rows
average seeds (``tiny.png``: mean ± std per row and column), into ``--out`` (default ``ROOT/tables``, never
the source tree). The table definitions come from ``--definitions`` (``results/paper.yaml``); the notes
say each row's recipe and starting weights, read from the sweep definitions (``slurm/sweeps/*.yaml``). A ``result.json``
that cannot be read is named on stderr (the tables are still written, the exit code is 1), never taken for a run
that has not finished. Imports no torch.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Sequence

from pretrain.runtime.cli import ArgumentParser, run_cli
from pretrain.runtime.errors import SuiteError
from pretrain.runtime.io import atomic_write_text

from .plots import plot_curves, plot_seeded_tables
from .provenance import run_origins
from .tables import PAPER_FILE, TableSpec, collect_runs, has_run, load_specs, render_csv, render_markdown

PROG = "python -m results"
TABLES = "tables"  # the default output folder under --root


def write_all(root: str, out: str, specs_path: str = str(PAPER_FILE), unreadable: list[str] | None = None
              ) -> list[str]:
    """Write every table file and plot; returns the paths written. ``unreadable`` receives one line per
    ``result.json`` that could not be read."""
    if not os.path.isdir(root):
        raise SuiteError(f"--root {root}: no such folder")
    runs = collect_runs(root, unreadable)
    by_file: dict[str, list[TableSpec]] = defaultdict(list)
    for spec in load_specs(specs_path):
        if spec.write == "always" or has_run(spec, runs):
            by_file[spec.file].append(spec)
    os.makedirs(out, exist_ok=True)
    origins = run_origins()
    written = []
    for name, specs in by_file.items():
        for suffix, text in ((".md", render_markdown(specs, runs, root, origins)), (".csv", render_csv(specs, runs))):
            path = os.path.join(out, name + suffix)
            atomic_write_text(path, text)
            written.append(path)
    written += plot_curves(runs, root, out)
    written += plot_seeded_tables([s for specs in by_file.values() for s in specs], runs, out)
    return written


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=(
        "Collect every result.json under --root into the paper's tables (markdown + CSV: paper number, this run, "
        "difference, run folder; a dash where no run has finished) and plot the loss and accuracy curves. Run "
        "folders are matched by name: the experiment names of slurm/sweeps/*.yaml."))
    parser.add_argument("--root", default="runs", help="folder holding the run folders [runs]")
    parser.add_argument("--out", metavar="DIR", help=f"folder for the tables and plots [ROOT/{TABLES}]")
    parser.add_argument("--definitions", default=str(PAPER_FILE), metavar="FILE",
                        help="the table definitions (YAML) [results/paper.yaml]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 after writing, 1 on a runtime error, 2 on a usage error."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        unreadable: list[str] = []
        for path in write_all(args.root, args.out or os.path.join(args.root, TABLES), args.definitions, unreadable):
            print(path)
        for problem in unreadable:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1 if unreadable else 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
