import subprocess
import sys

from pretrain.info import model_info


def test_resnet50_matches_table_4() -> None:
    info = model_info("resnet50")
    assert round(info.params_m, 1) == 25.6
    assert round(info.flops_g, 1) == 4.1


def test_cli_prints_and_rejects_unknown_models() -> None:
    ok = subprocess.run([sys.executable, "-m", "pretrain.info", "--model", "resnet18", "--input-size", "64"],
                        capture_output=True, text=True, check=True)
    assert ok.stdout.startswith("resnet18: 11.7 M params")
    bad = subprocess.run([sys.executable, "-m", "pretrain.info", "--model", "resnet5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown timm model 'resnet5'" in bad.stderr
