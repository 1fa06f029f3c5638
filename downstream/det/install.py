"""Install Detectron2 0.6 (pure Python) into this interpreter's environment when it has none.

``python -m downstream.det.install [--check] [--python PYTHON]`` (``make setup`` runs it after installing the
suite). Detectron2 publishes no wheel for today's torch. When ``import detectron2`` fails because it is absent,
this follows the route recorded in ENVIRONMENT.md:

1. download the registry's ``pb1-detectron2==0.6`` source distribution (the detectron2 v0.6 release, without
   its ``layers/csrc`` C++ sources). Its metadata names a URL dependency in an optional extra, which pip 26
   refuses, so pip 26 and later download it with a pip 25 run from its own wheel; the environment's pip is
   left as it is;
2. repackage its ``detectron2/`` folder (model-zoo configs included) as a pure-Python distribution
   ``detectron2==0.6+pyonly`` whose dependencies are the runtime needs of what the suite and the model zoo use,
   and ``pip install`` it.

An existing detectron2 (a cluster's source build with its CUDA ops) is never touched; one that is installed
but fails to import is reported, not replaced. The shims this route needs at run time live in
:mod:`downstream.det.compat`. Imports nothing heavy (no torch, no numpy).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pretrain.runtime.cli import ArgumentParser, run_cli
from pretrain.runtime.errors import SuiteError

__all__ = ["RUNTIME_REQUIREMENTS", "SDIST", "InstallError", "detectron2_state", "install_detectron2", "main"]

PROG = "python -m downstream.det.install"
SDIST = "pb1-detectron2==0.6"
DIST_NAME, DIST_VERSION = "detectron2", "0.6+pyonly"
# What the pure-Python package imports (setup.py of v0.6 minus its build-, caffe2- and lazy-config-printing
# extras: black, future, pydot, hydra-core). iopath's upper pin of v0.6 (<0.1.10) is lifted: the suite's
# iopath 0.1.10 serves it. setuptools < 80 keeps ``pkg_resources``, which ``detectron2.model_zoo`` imports.
RUNTIME_REQUIREMENTS = (
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate", "cloudpickle",
    "tqdm>4.29.0", "tensorboard", "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7", "omegaconf>=2.1,<2.4", "setuptools<80",
)
OLD_PIP = "pip<26"  # pip 26 refuses the sdist's metadata ("cannot declare direct URL dependencies")


class InstallError(SuiteError):
    """A step of the install route failed (the message names the step and pip's last line)."""


def detectron2_state(python: str = sys.executable) -> tuple[str, str]:
    """``("present", version)``, ``("absent", "")`` or ``("broken", reason)`` for ``python``'s detectron2.

    Runs ``import detectron2`` in a child process, so this process imports nothing.
    """
    probe = "import detectron2, sys; sys.stdout.write(detectron2.__version__)"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if done.returncode == 0:
        return "present", done.stdout.strip()
    last = (done.stderr.strip().splitlines() or ["import failed"])[-1]
    if "No module named 'detectron2'" in last:
        return "absent", ""
    return "broken", last


def _pip(python: str, args: Sequence[str], what: str, pip_entry: Sequence[str] | None = None) -> str:
    command = [*(pip_entry or [python, "-m", "pip"]), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        raise InstallError(f"{what} failed: {lines[-1] if lines else 'pip exited ' + str(done.returncode)}")
    return done.stdout


def _pip_major(python: str) -> int:
    version = _pip(python, ["--version"], "pip --version").split()[1]
    return int(version.split(".")[0])


def _download_sdist(python: str, work: Path) -> Path:
    """``pb1-detectron2-0.6.tar.gz`` in ``work`` (its setup.py imports torch: torch must be installed)."""
    entry = None
    if _pip_major(python) >= 26:
        _pip(python, ["download", "--no-deps", "--quiet", OLD_PIP, "-d", str(work / "pip")], f"downloading {OLD_PIP}")
        wheel = next((work / "pip").glob("pip-*.whl"))
        entry = [python, str(wheel / "pip")]  # pip runs from its own wheel
    _pip(python, ["download", "--no-deps", "--no-build-isolation", "--quiet", SDIST, "-d", str(work / "sdist")],
         f"downloading {SDIST}", entry)
    archives = sorted((work / "sdist").glob("*.tar.gz"))
    if not archives:
        raise InstallError(f"downloading {SDIST} gave no source archive in {work / 'sdist'}")
    return archives[0]


def _stage(archive: Path, work: Path) -> Path:
    """A project folder holding the sdist's ``detectron2/`` package and a pyproject without C++ extension."""
    with tarfile.open(archive) as tar:  # extraction filters: Python >= 3.10.12 / 3.11.4
        tar.extractall(work / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    packages = list((work / "src").glob("*/detectron2/__init__.py"))
    if not packages:
        raise InstallError(f"{archive.name} holds no detectron2/ package")
    project = work / "project"
    shutil.copytree(packages[0].parent, project / "detectron2")
    requirements = ",\n    ".join(f'"{r}"' for r in RUNTIME_REQUIREMENTS)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{DIST_NAME}"\nversion = "{DIST_VERSION}"\n'
        f'description = "Detectron2 v0.6 Python package from {SDIST}, without the C++ ops"\n'
        f'requires-python = ">=3.8"\ndependencies = [\n    {requirements},\n]\n\n'
        '[tool.setuptools.packages.find]\ninclude = ["detectron2*"]\n\n'
        '[tool.setuptools.package-data]\n"detectron2.model_zoo" = ["configs/**/*.yaml", "configs/**/*.py"]\n'
    )
    return project


def install_detectron2(python: str = sys.executable, work: Path | None = None) -> str:
    """Run the route for ``python``'s environment; returns the installed version. Raises :class:`InstallError`."""
    with tempfile.TemporaryDirectory(prefix="detectron2-install-") as tmp:
        folder = Path(work or tmp)
        project = _stage(_download_sdist(python, folder), folder)
        _pip(python, ["install", "--quiet", str(project)], f"installing {DIST_NAME} {DIST_VERSION}")
    state, version = detectron2_state(python)
    if state != "present":
        raise InstallError(f"detectron2 was installed but does not import: {version}")
    return version


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Install Detectron2 0.6 (pure Python, from the registry's pb1-detectron2 sdist) into this "
                    "environment if it has none; an existing detectron2 is left untouched.",
    )
    parser.add_argument("--check", action="store_true", help="only report whether detectron2 imports (exit 1 if not)")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose environment to use (default: this)")
    return parser


def _body(args: argparse.Namespace) -> int:
    state, detail = detectron2_state(args.python)
    if state == "present":
        print(f"detectron2 {detail} already imports; left untouched")
        return 0
    if state == "broken":
        raise InstallError(f"an installed detectron2 fails to import ({detail}); not replacing it: repair or "
                           f"uninstall it, then rerun {PROG}")
    if args.check:
        raise InstallError(f"detectron2 is not installed; run {PROG}")
    print(f"detectron2 not found: installing it from {SDIST} (pure Python, see {PROG} --help)", flush=True)
    print(f"installed detectron2 {install_detectron2(args.python)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _body(args))


if __name__ == "__main__":
    sys.exit(main())
