"""The hardware rule for precision and memory layout (pretrain/runtime/precision.py), on any machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.data import make_demo_dataset
from pretrain.runtime.precision import Capabilities, probe_capabilities, resolve_precision

REPO = Path(__file__).resolve().parents[1]
NATIVE_CPU = Capabilities("cpu", True, "Xeon with AMX", "avx512_bf16=yes, amx=yes")
AVX2_CPU = Capabilities("cpu", False, "Ryzen 3000", "avx512_bf16=no, amx=no")
AMPERE = Capabilities("cuda", True, "A100", "compute capability 8.0")
VOLTA = Capabilities("cuda", False, "V100", "compute capability 7.0")
# oneDNN limited to AVX2 and ATen to its AVX2 kernels: how a CPU without AVX-512 behaves (issue 9)
EMULATED_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize(("caps", "amp", "channels_last"), [
    (NATIVE_CPU, "bf16", True),
    (AVX2_CPU, "none", True),
    (AMPERE, "bf16", True),
    (VOLTA, "none", False),
])
def test_auto_picks_bf16_only_where_it_is_native(caps, amp, channels_last):
    precision = resolve_precision("auto", "auto", caps)
    assert (precision.amp, precision.channels_last, precision.warning) == (amp, channels_last, None)
    assert "auto" in precision.reason and ("natively" in precision.reason) == caps.bf16_native


def test_explicit_choices_win_and_emulated_bf16_warns():
    emulated = resolve_precision("bf16", "off", AVX2_CPU)
    assert (emulated.amp, emulated.channels_last) == ("bf16", False)
    assert "emulated" in emulated.warning and "Ryzen 3000" in emulated.warning and "\n" not in emulated.warning
    assert resolve_precision("bf16", "auto", NATIVE_CPU).warning is None
    assert resolve_precision("none", "auto", NATIVE_CPU).amp == "none"
    assert resolve_precision("auto", True, AVX2_CPU).channels_last is True  # booleans from YAML
    with pytest.raises(ValueError, match="amp must be"):
        resolve_precision("fp16", "auto", NATIVE_CPU)


def test_probe_sees_no_native_bf16_when_onednn_is_limited_to_avx2():
    code = "from pretrain.runtime.precision import probe_capabilities; c = probe_capabilities('cpu')\n" \
           "print(c.bf16_native, c.detail)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **EMULATED_AVX2}, capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("False") and "ONEDNN_MAX_CPU_ISA=AVX2" in out
    assert probe_capabilities("cpu").device_type == "cpu"


def test_a_run_logs_and_records_the_choice_first(tmp_path):
    """On an (emulated) CPU without native bf16 the run picks fp32, says so in its first log line and stores
    it in config.json and result.json; an explicit --amp bf16 still runs, with a one-line warning."""
    data = make_demo_dataset(tmp_path / "demo", num_classes=2, train_per_class=4, val_per_class=1, image_size=64)
    argv = [sys.executable, "-m", "pretrain", "--preset", "tiny", "--input-size", "64", "--decoder-width", "64",
            "--batch-size", "4", "--global-batch", "4", "--epochs", "1", "--workers", "0", "--no-progress",
            "--no-tensorboard", "--data", str(data / "train")]
    env = {**os.environ, **EMULATED_AVX2}
    auto = subprocess.run([*argv, "--out", str(tmp_path / "auto")], env=env, capture_output=True, text=True)
    assert auto.returncode == 0, auto.stderr[-2000:]
    first = auto.stderr.splitlines()[0]
    assert "precision fp32, channels-last" in first and "no native bf16" in first
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert (config["amp"], config["precision"]["amp"], config["precision"]["channels_last"]) == ("auto", "none", True)
    result = json.loads((tmp_path / "auto" / "result.json").read_text())
    assert result["config"]["precision"] == config["precision"]
    printed = subprocess.run([*argv, "--print-config"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(printed.stdout)["precision"] == config["precision"]  # --print-config shows this machine's

    forced = subprocess.run([*argv, "--out", str(tmp_path / "bf16"), "--amp", "bf16"], env=env,
                            capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr[-2000:]
    warnings = [line for line in forced.stderr.splitlines() if "WARNING" in line and "emulated" in line]
    assert len(warnings) == 1 and "precision bf16 autocast" in forced.stderr.splitlines()[0]
