"""Shared by the whole suite: what a test may skip (and what it must not under CI), and one tiny SparK
pretraining run that the pretraining, fine-tuning and detection tests all start from."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]

# The tiny pretraining of the tests: resnet18 at 64 px with a 64-wide decoder, batches of 4 from 16 generated
# images (4 steps per epoch), deterministic, no loader workers (a killed run resumes bit-exactly only with 0).
PRETRAIN_TINY = ["--preset", "tiny", "--input-size", "64", "--decoder-width", "64", "--batch-size", "4",
                 "--global-batch", "4", "--workers", "0", "--log-every", "1", "--deterministic", "--no-progress"]
PRETRAIN_EPOCHS, PRETRAIN_STEPS_PER_EPOCH = 3, 4


def skip_or_fail(reason: str) -> None:
    """Skip the test for ``reason``, but fail it under CI (``CI`` set), where nothing may be missing: the only
    skips CI accepts are the CUDA cases on a machine without CUDA."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


def require(module: str) -> ModuleType:
    """``module`` imported, or the test skipped (failed under CI) with the import error as the reason."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        skip_or_fail(f"{module} cannot be imported: {error}")
        raise  # not reached: skip and fail raise


def pretrain_argv(data: Path, out: Path, *extra: str, epochs: int = PRETRAIN_EPOCHS) -> list[str]:
    """``python -m pretrain`` arguments of the tests' tiny run on ``data`` into ``out``."""
    return [*PRETRAIN_TINY, "--data", str(data), "--out", str(out), "--epochs", str(epochs), *extra]


def run_pretrain(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m pretrain ARGV`` in a fresh process from the repository root."""
    return subprocess.run([sys.executable, "-m", "pretrain", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def pretrain_images(tmp_path_factory) -> Path:
    """16 generated training images of 64 px in 2 class folders (the train/ folder of a demo set)."""
    from pretrain.data import make_demo_dataset

    root = make_demo_dataset(tmp_path_factory.mktemp("pretrain-data") / "demo", num_classes=2, train_per_class=8,
                             val_per_class=1, image_size=64)
    return root / "train"


@pytest.fixture(scope="session")
def spark_run(pretrain_images, tmp_path_factory) -> Path:
    """The run folder of one complete tiny pretraining (3 epochs, 12 steps), run once per session as a user runs
    it: the pretraining tests check its outputs and resume against it; fine-tuning and detection start from its
    ``checkpoint-last.pth``. Tests must not write into it."""
    out = tmp_path_factory.mktemp("spark-run")
    done = run_pretrain(pretrain_argv(pretrain_images, out, "--save-every", "2", "--snapshot-every", "2",
                                      "--progress"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done: {PRETRAIN_EPOCHS} epochs" in done.stdout
    assert f"epoch {PRETRAIN_EPOCHS}/{PRETRAIN_EPOCHS}" in done.stderr  # the tqdm bar
    return out
