"""Image folders, corrupt-file handling, transforms, the demo set and the data CLI, on real files."""

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pretrain.data import (
    DataError,
    DemoSpec,
    ImageFolderDataset,
    build_eval_dataset,
    build_pretrain_dataset,
    collate_skip_corrupt,
    default_demo_root,
    denormalize,
    ensure_demo_data,
    eval_transform,
    make_demo_dataset,
    pretrain_transform,
)
from pretrain.data import demo as demo_module
from pretrain.data.__main__ import main as data_main

TINY = {"num_classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 48}
REPO = Path(__file__).resolve().parents[1]


def _write_image(path: Path, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a JPEG at all" * 10)
    return path


def _hashes(root: Path) -> dict[str, str]:
    files = [path for path in root.rglob("*") if path.is_file()]
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


# --- folders -------------------------------------------------------------------------------------


def test_flat_folder_is_unlabelled_sorted_and_case_insensitive(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.JPEG"):
        _write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    _write_image(tmp_path / ".hidden.png")
    (tmp_path / "empty_subfolder").mkdir()

    dataset = ImageFolderDataset(tmp_path)

    assert [Path(p).name for p, _ in dataset.samples] == ["a.jpg", "b.PNG", "c.JPEG"]
    assert dataset.classes == []
    image, label = dataset[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == -1


def test_imagenet_layout_labels_by_sorted_class_folder(tmp_path):
    _write_image(tmp_path / "n02" / "x.jpg")
    _write_image(tmp_path / "n01" / "b.png")
    _write_image(tmp_path / "n01" / "nested" / "a.png")
    (tmp_path / "readme.md").write_text("ignored")

    dataset = build_pretrain_dataset(tmp_path, input_size=32)

    assert dataset.classes == ["n01", "n02"]
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in dataset.samples] == [
        ("n01/b.png", 0),
        ("n01/nested/a.png", 0),
        ("n02/x.jpg", 1),
    ]
    image, label = dataset[2]
    assert image.shape == (3, 32, 32) and label == 1


def test_corrupt_image_is_skipped_logged_and_counted(tmp_path, caplog):
    for index in range(3):
        _write_image(tmp_path / f"good{index}.png", seed=index)
    bad = _write_garbage(tmp_path / "bad.jpg")
    dataset = build_pretrain_dataset(tmp_path, input_size=32)
    bad_index = [Path(p).name for p, _ in dataset.samples].index("bad.jpg")

    with caplog.at_level(logging.WARNING):
        assert dataset[bad_index] is None
    assert str(bad) in caplog.text

    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip_corrupt)
    images, labels, num_skipped = next(iter(loader))
    assert images.shape == (3, 3, 32, 32)
    assert labels.tolist() == [-1, -1, -1]
    assert num_skipped == 1


def test_truncated_image_is_skipped(tmp_path):
    good = _write_image(tmp_path / "good.png", size=(64, 64))
    _write_image(tmp_path / "truncated.png", size=(64, 64), seed=1)
    data = (tmp_path / "truncated.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])

    dataset = ImageFolderDataset(tmp_path)

    assert dataset[0] is not None and Path(dataset.samples[0][0]) == good
    assert dataset[1] is None


def test_collate_of_an_all_corrupt_batch_is_empty():
    images, labels, num_skipped = collate_skip_corrupt([None, None])
    assert len(images) == 0 and len(labels) == 0 and num_skipped == 2


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no image files"),
        (lambda root: (root.mkdir(), (root / "a.txt").write_text("x")), "no image files"),
        (lambda root: (root.mkdir(), (root / "empty_class").mkdir()), "no image files"),
        (lambda root: (_write_garbage(root / "c1" / "a.jpg"), _write_garbage(root / "c2" / "b.png")), "decoded"),
        (lambda root: (root.parent.mkdir(exist_ok=True), root.write_text("file")), "not a folder"),
    ],
    ids=["missing", "empty", "no-image-files", "empty-class-folder", "none-readable", "a-file"],
)
def test_unusable_data_path_raises_one_clear_error(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message) as error:
        build_pretrain_dataset(root, input_size=32)
    assert str(root) in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_readability_check_stops_at_the_first_decodable_file(tmp_path, caplog):
    _write_garbage(tmp_path / "a_bad.jpg")
    _write_image(tmp_path / "b_good.png")
    for index in range(5):
        _write_garbage(tmp_path / f"c_bad{index}.jpg")

    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(tmp_path)
        assert dataset.check_readable() == 1

    assert "a_bad.jpg" in caplog.text
    assert "c_bad" not in caplog.text


# --- transforms ----------------------------------------------------------------------------------


def test_transforms_give_normalised_square_tensors():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    torch.manual_seed(0)
    train = pretrain_transform(64)(image)
    view = eval_transform(64)(image)
    assert train.shape == view.shape == (3, 64, 64)
    assert view.min() < 0 < view.max()  # normalised, not [0, 1]
    assert denormalize(view).min() >= 0.0 and denormalize(view).max() <= 1.0


def test_eval_transform_is_deterministic_and_denormalize_inverts_it():
    image = Image.new("RGB", (64, 64), (255, 128, 0))
    first, second = eval_transform(32)(image), eval_transform(32)(image)
    assert torch.equal(first, second)
    expected = torch.tensor([1.0, 128 / 255, 0.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(denormalize(first), expected, atol=1e-5)


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.8, 0.5), (0.5, 1.2)])
def test_pretrain_transform_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        pretrain_transform(64, scale=scale)


# --- demo data -----------------------------------------------------------------------------------


def test_demo_data_layout_and_classes(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **TINY)

    train = build_pretrain_dataset(root / "train", input_size=32)
    val = build_eval_dataset(root / "val", input_size=32)

    assert len(train.classes) == 3 and train.classes == val.classes
    assert len(train) == 12 and len(val) == 6
    assert sorted({y for _, y in train.samples}) == [0, 1, 2]
    assert all(len(name.split("-")) == 2 for name in train.classes)  # shape-texture
    with Image.open(train.samples[0][0]) as image:
        assert image.size == (48, 48)
    assert (root / "demo.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folders left


def test_demo_data_is_byte_for_byte_deterministic(tmp_path):
    first = _hashes(make_demo_dataset(tmp_path / "a", **TINY, seed=3))
    second = _hashes(make_demo_dataset(tmp_path / "b", **TINY, seed=3))
    other = _hashes(make_demo_dataset(tmp_path / "c", **TINY, seed=4))
    assert first == second
    assert len(first) == 3 * (4 + 2) + 1
    assert first != other


def test_demo_classes_differ_by_shape_and_texture_not_colour():
    spec = DemoSpec()
    shapes = {name.split("-")[0] for name in spec.classes}
    textures = {name.split("-")[1] for name in spec.classes}
    assert len(shapes) >= 2 and len(textures) >= 2
    colours = [
        np.asarray(demo_module.render_demo_image("circle-plain", 64, np.random.default_rng(i)).convert("RGB"))
        .reshape(-1, 3)
        .mean(axis=0)
        for i in range(4)
    ]
    assert np.ptp(np.stack(colours), axis=0).max() > 20  # colours vary within a class


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return Image.new("P", (48, 48))

    monkeypatch.setattr(demo_module, "render_demo_image", failing)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "demo", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_kept_unless_overwrite(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **TINY, seed=1)
    with pytest.raises(FileExistsError):
        make_demo_dataset(root, **TINY, seed=2)
    make_demo_dataset(root, **TINY, seed=2, overwrite=True)
    assert _hashes(root) == _hashes(make_demo_dataset(tmp_path / "ref", **TINY, seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "ref"]


def test_demo_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="num_classes"):
        DemoSpec(num_classes=999)
    with pytest.raises(ValueError, match="image_size"):
        DemoSpec(image_size=8)


def test_default_root_and_ensure_generate_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_DEMO_DATA", str(tmp_path / "cache"))
    assert default_demo_root() == tmp_path / "cache"
    spec = DemoSpec(**TINY)

    root = ensure_demo_data(spec=spec)
    stamp = (root / "demo.json").stat().st_mtime_ns
    again = ensure_demo_data(spec=spec)

    assert root == again == tmp_path / "cache"
    assert (root / "demo.json").stat().st_mtime_ns == stamp


def test_default_demo_set_is_small(tmp_path):
    root = make_demo_dataset(tmp_path / "demo")
    files = list(root.rglob("*.png"))
    assert len(files) == 8 * (64 + 16)
    assert sum(p.stat().st_size for p in files) < 10 * 2**20


# --- command line --------------------------------------------------------------------------------


def test_cli_make_demo_subprocess(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.data", "make-demo", str(out), "--classes", "2", "--train-per-class", "2"]
        + ["--val-per-class", "1", "--image-size", "40", "--seed", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((out / "train").glob("*/*.png"))) == 4
    assert len(list((out / "val").glob("*/*.png"))) == 2


def test_cli_help_lists_tools(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data_main(["--help"])
    assert exit_info.value.code == 0
    assert "make-demo" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["make-demo", "x", "--classes", "0"], ["make-demo", "x", "--seed", "a"], ["nope"]])
def test_cli_usage_errors_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        data_main(bad)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_runtime_errors_exit_1_with_one_line(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "demo", **TINY)
    assert data_main(["make-demo", str(root), "--classes", "2"]) == 1
    assert data_main(["check", str(tmp_path / "missing")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2
    assert "--force" in errors[0] and str(tmp_path / "missing") in errors[1]


def test_cli_check_reports_layout(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "demo", **TINY)
    assert data_main(["check", str(root / "train")]) == 0
    assert "12 image files, 3 classes" in capsys.readouterr().out
