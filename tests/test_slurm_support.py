"""Helpers shared by the sweep and result-table tests (test_slurm*.py, test_results*.py); no tests here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "slurm" / "launch_all.py")
IMPORT_LINE = re.compile(r"^import time:.*\|\s*(\S+)\s*$", re.M)


@dataclass(frozen=True)
class Tool:
    """A finished command: exit code, stdout, stderr without import-time lines, heavy modules it imported (torch,
    timm) and every top-level module it imported."""

    returncode: int
    stdout: str
    stderr: str
    heavy: list[str]
    imported: frozenset[str] = frozenset()


def run_tool(*argv: str, timeout: float = 300, env: dict[str, str] | None = None) -> Tool:
    """Run ``python -X importtime ARGV`` from the repository root; report whether torch or timm was imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)
    modules = {m.group(1).split(".")[0] for m in IMPORT_LINE.finditer(done.stderr)}
    stderr = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))
    return Tool(done.returncode, done.stdout, stderr, sorted(modules & {"torch", "timm"}), frozenset(modules))


def slurm_reason() -> str:
    """Why no SLURM cluster is usable here ("" when ``sinfo`` reaches a controller)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch/sinfo not installed (run slurm/local_cluster.sh up as root)"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    if done.returncode != 0:
        return f"no SLURM controller answers: {done.stderr.strip()} (slurm/local_cluster.sh up)"
    if not any(s.startswith(("idle", "mixed", "allocated", "completing")) for s in done.stdout.split()):
        return f"no usable SLURM node (states: {done.stdout.split()})"
    return ""


def require_slurm() -> None:
    """Skip without a SLURM cluster, but fail under CI (``CI`` set), where .ci/run brings one up."""
    reason = slurm_reason()
    if reason:
        skip_or_fail(f"SLURM is not usable: {reason}")
