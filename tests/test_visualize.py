"""Figure-4 reconstructions from a real (tiny) checkpoint: the loader, the drawing API and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain.checkpoint import load_spark_checkpoint
from pretrain.data import make_demo_dataset
from pretrain.runtime.checkpoint import CheckpointError
from pretrain.spark import build_spark
from pretrain.visualize import draw_reconstructions, main

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "model": "resnet18",
    "input_size": 64,
    "decoder_width": 64,
    "mask_ratio": 0.6,
    "densify_norm": "auto",
    "masking": "sparse",
    "hierarchy": True,
    "ape": False,
    "loss_on": "masked",
    "epochs": 1,  # extra keys written by the runner are ignored
}


def _build(config: dict) -> torch.nn.Module:
    spark_kwargs = {k: config[k] for k in ("mask_ratio", "densify_norm", "masking", "hierarchy", "ape", "loss_on")}
    return build_spark(
        config["model"], decoder_width=config["decoder_width"], input_size=config["input_size"], **spark_kwargs
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "checkpoint-last.pth"
    torch.save({"model": _build(CONFIG).state_dict(), "config": CONFIG, "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    make_demo_dataset(root, num_classes=2, train_per_class=2, val_per_class=2, image_size=72)
    return root / "val"


def test_load_checkpoint_round_trip(checkpoint):
    model, config = load_spark_checkpoint(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    assert not model.training
    assert config["model"] == "resnet18" and model.input_size == 64
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert load_spark_checkpoint(checkpoint, mask_ratio=0.25)[0].mask_ratio == 0.25


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.pth", "not found"),
        (lambda d: (d / "garbage.pth").write_bytes(b"\x00garbage") and d / "garbage.pth", "cannot read"),
        (lambda d: _save(d / "list.pth", [1, 2]), "has no known weights layout"),
        (lambda d: _save(d / "noconf.pth", {"model": _build(CONFIG).state_dict(), "config": {"model": "resnet18"}}),
         "lacks input_size"),
        (lambda d: _save(d / "wrong.pth", {"model": _build(CONFIG).state_dict(),
                                           "config": {**CONFIG, "decoder_width": 128}}),
         "cannot build the SparK model .* of another shape"),
        (lambda d: _save(d / "encoder.pth", _build(CONFIG).encoder_state_dict()), "holds no SparK decoder"),
    ],
    ids=["missing", "garbage", "not-a-dict", "config-keys", "weights", "encoder-only"],
)
def test_bad_checkpoint_raises_checkpoint_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_spark_checkpoint(path)
    assert str(path) in str(error.value)


def test_draw_reconstructions_writes_a_png(tmp_path):
    torch.manual_seed(0)
    model = _build(CONFIG).eval()
    images = torch.randn(2, 3, 64, 64)
    active = model.mask(2, "cpu", generator=torch.Generator().manual_seed(0))

    out = draw_reconstructions(model, images, active, tmp_path / "figs" / "recon.png")

    with Image.open(out) as figure:
        assert figure.format == "PNG"
        width, height = figure.size
    assert width > height > 200  # 4 columns, 2 rows
    assert [p.name for p in out.parent.iterdir()] == ["recon.png"]  # temporary file renamed away


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pretrain.visualize", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)


def test_cli_end_to_end(checkpoint, images_dir, tmp_path):
    out = tmp_path / "recon.png"
    result = _run_cli("--weights", str(checkpoint), "--images", str(images_dir), "--out", str(out), "--num", "3")
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000
    with Image.open(out) as figure:
        assert figure.size[1] > 400  # three rows


def test_cli_missing_checkpoint_is_one_line_error(images_dir, tmp_path):
    missing = tmp_path / "nope.pth"
    result = _run_cli("--weights", str(missing), "--images", str(images_dir), "--out", str(tmp_path / "r.png"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and str(missing) in result.stderr
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("images", ["missing", "empty", "unreadable"])
def test_cli_bad_images_folder(checkpoint, tmp_path, capsys, images):
    folder = tmp_path / "images"
    if images != "missing":
        folder.mkdir()
    if images == "unreadable":
        (folder / "a.jpg").write_bytes(b"garbage")
    assert main(["--weights", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "r.png")]) == 1
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and str(folder) in error_lines[0]


@pytest.mark.parametrize(
    "extra", [["--num", "0"], ["--mask-ratio", "1.5"], ["--input-size", "50"], ["--out", "x.unknownformat"]]
)
def test_cli_usage_errors_exit_2(checkpoint, images_dir, tmp_path, extra):
    args = ["--weights", str(checkpoint), "--images", str(images_dir), "--out", str(tmp_path / "r.png"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2


def test_cli_in_process_with_overrides(checkpoint, images_dir, tmp_path, capsys):
    out = tmp_path / "recon.png"
    args = ["--weights", str(checkpoint), "--images", str(images_dir), "--out", str(out)]
    assert main([*args, "--num", "2", "--mask-ratio", "0.3", "--input-size", "96", "--seed", "1"]) == 0
    assert out.is_file() and "mask ratio 0.3" in capsys.readouterr().out
