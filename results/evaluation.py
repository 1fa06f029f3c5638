"""``python -m results.evaluation --root ROOT --model NAME [--out ROOT/tables]``: the table of a one-launch
checkpoint evaluation (``python slurm/launch_all.py --weights FILE``) beside the paper's SparK row of its
architecture.

The tables are data (``results/evaluation.yaml``, paper.yaml's format plus a ``models`` glob list per table): the
first ``write: always`` table whose ``models`` match the architecture, and every matching ``when_run`` table with a
finished run (the demo data's), written as ``evaluation.md`` / ``evaluation.csv`` by :mod:`results.tables`. Imports
no torch.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pretrain.runtime.cli import ArgumentParser, run_cli
from pretrain.runtime.errors import SuiteError
from pretrain.runtime.io import atomic_write_text

from .__main__ import TABLES
from .tables import TableSpec, collect_runs, has_run, load_specs, render_csv, render_markdown

__all__ = ["EVALUATION_FILE", "evaluation_specs", "main", "write_evaluation"]

PROG = "python -m results.evaluation"
EVALUATION_FILE = Path(__file__).resolve().parent / "evaluation.yaml"
OUTPUT = "evaluation"


def evaluation_specs(model: str, runs: Sequence[str] | dict, path: str | os.PathLike = EVALUATION_FILE
                     ) -> list[TableSpec]:
    """The tables of ``path`` for architecture ``model`` given the finished ``runs`` (see the module docstring)."""
    matching = [s for s in load_specs(path) if any(fnmatch.fnmatchcase(model, g) for g in s.models)]
    first = next((s for s in matching if s.write == "always"), None)
    return [s for s in matching if s is first or (s.write == "when_run" and has_run(s, runs))]


def write_evaluation(root: str, out: str, model: str, path: str | os.PathLike = EVALUATION_FILE) -> list[str]:
    """Write ``evaluation.md`` / ``evaluation.csv`` for ``model`` into ``out``; returns the paths written."""
    runs = collect_runs(root)
    specs = evaluation_specs(model, runs, path)
    if not specs:
        raise SuiteError(f"{path} has no table for architecture {model}")
    os.makedirs(out, exist_ok=True)
    written = []
    for suffix, text in ((".md", render_markdown(specs, runs, root)), (".csv", render_csv(specs, runs))):
        target = os.path.join(out, OUTPUT + suffix)
        atomic_write_text(target, text)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 after writing, 1 on a runtime error, 2 on a usage error."""
    parser = ArgumentParser(prog=PROG, description="Write the table of a one-launch checkpoint evaluation "
                            "(evaluation.md/.csv: this checkpoint beside the paper's SparK row of its architecture).")
    parser.add_argument("--root", default="runs", help="folder holding the run folders [runs]")
    parser.add_argument("--out", metavar="DIR", help=f"folder for the tables [ROOT/{TABLES}]")
    parser.add_argument("--model", required=True, help="the checkpoint's timm architecture")
    parser.add_argument("--definitions", default=str(EVALUATION_FILE), metavar="FILE",
                        help="the evaluation table definitions (YAML) [results/evaluation.yaml]")
    args = parser.parse_args(argv)

    def body() -> int:
        if not os.path.isdir(args.root):
            raise SuiteError(f"--root {args.root}: no such folder")
        for path in write_evaluation(args.root, args.out or os.path.join(args.root, TABLES), args.model,
                                     args.definitions):
            print(path)
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
