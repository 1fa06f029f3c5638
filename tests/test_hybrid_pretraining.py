"""A whole SparK pretraining run of the ``tiny`` preset on a hybrid (attention over visible tokens) learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.__main__ import run as pretrain_run

HYBRID = "edgenext_xx_small"  # the smallest hybrid that runs on the tiny preset's 96 px (3x3 patches)


@pytest.mark.slow  # the tiny preset as it is: 12 epochs of the embedded demo set, minutes on 2 cores
def test_tiny_preset_on_a_hybrid_learns(tmp_path: Path) -> None:
    outcome = pretrain_run(["--preset", "tiny", "--model", HYBRID, "--no-progress", "--no-tensorboard",
                            "--out", str(tmp_path)])
    assert outcome.status == "completed"
    result = json.loads((tmp_path / "result.json").read_text())
    losses = result["metrics"]["epoch_losses"]
    assert result["model"] == HYBRID and len(losses) == 12
    assert losses[-1] <= losses[0] * 2 / 3, f"epoch-mean loss {losses[0]:.3f} -> {losses[-1]:.3f}"
