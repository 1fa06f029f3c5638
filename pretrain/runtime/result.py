"""``result.json``: what every stage writes on success, in one schema, readable without torch.

``{"schema": 1, "stage", "model", "status": "completed", "finished", "metrics": {...}, "config": {...},
"inputs": {...}, "outputs": {...}}``. ``stage`` is ``pretrain``, ``cls`` or ``det``; ``metrics`` holds the
stage's numbers (flat names, floats or lists); ``config`` the resolved configuration; ``inputs`` what the run
started from (data, weights, resumed checkpoint); ``outputs`` the files it wrote.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from iopath.common.file_io import PathManager

from .errors import SuiteError
from .io import atomic_write_json, join, read_json

__all__ = ["METRICS", "RESULT", "SCHEMA_VERSION", "STAGES", "ResultError", "RunResult", "find_results",
           "read_metrics", "read_result", "write_result"]

RESULT = "result.json"
METRICS = "metrics.jsonl"  # one JSON record per logging step, written by every stage
SCHEMA_VERSION = 1
STAGES = ("pretrain", "cls", "det")


class ResultError(SuiteError):
    """A ``result.json`` that is missing, malformed or not in this schema."""


@dataclass(frozen=True)
class RunResult:
    """The content of one ``result.json``."""

    stage: str
    model: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"
    finished: str = ""  # ISO time the result was written
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_result(
    out: str, stage: str, model: str, metrics: Mapping[str, Any], config: Mapping[str, Any],
    inputs: Mapping[str, Any] | None = None, outputs: Mapping[str, Any] | None = None,
    pm: PathManager | None = None,
) -> RunResult:
    """Atomically write ``out/result.json`` for a finished ``stage`` run; returns what was written."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = RunResult(stage, model, dict(metrics), dict(config), dict(inputs or {}), dict(outputs or {}),
                       finished=finished)
    atomic_write_json(join(out, RESULT), result.to_dict(), pm)
    return result


def read_result(path: str | os.PathLike, pm: PathManager | None = None) -> RunResult:
    """Read a ``result.json`` (or the one in a run folder); :class:`ResultError` naming the problem."""
    path = str(path)
    if not path.endswith(".json"):
        path = join(path, RESULT)
    try:
        values = read_json(path, pm)
    except FileNotFoundError as error:
        raise ResultError(f"no result file at {path}") from error
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultError(f"cannot read {path}: {error}") from error
    required = {"stage", "model", "metrics", "config"}
    if not isinstance(values, dict) or not required <= values.keys():
        raise ResultError(f"{path} is not a result file (needs keys {', '.join(sorted(required))})")
    known = {f for f in RunResult.__dataclass_fields__}
    return RunResult(**{k: v for k, v in values.items() if k in known})


def find_results(root: str | os.PathLike, unreadable: list[str] | None = None) -> Iterator[tuple[str, RunResult]]:
    """``(run folder, result)`` for every readable ``result.json`` below ``root``, in sorted folder order.

    A file that exists but cannot be read (writes are atomic, so a crash never leaves one: something else damaged
    it) is not a run that has not finished: its error line goes to ``unreadable`` (when given).
    """
    for folder, _, names in sorted(os.walk(root)):
        if RESULT in names:
            try:
                yield folder, read_result(os.path.join(folder, RESULT))
            except ResultError as error:
                if unreadable is not None:
                    unreadable.append(str(error))


def read_metrics(path: str | os.PathLike, pm: PathManager | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or the one in a run folder); [] if there is none.

    A partial last line (a crash mid-write) is ignored.
    """
    pm = pm or PathManager()
    path = str(path)
    if not path.endswith(".jsonl"):
        path = join(path, METRICS)
    if not pm.exists(path):
        return []
    records = []
    with pm.open(path, "r") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
