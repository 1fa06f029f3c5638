"""COCO-layout data for the detection stage: the embedded demo set, checks, and Detectron2 registration.

``python -m downstream.det.data make-demo DIR`` draws a small deterministic instance-segmentation set in the
standard COCO layout, so every tool reads it like COCO itself::

    DIR/annotations/instances_train2017.json   DIR/train2017/*.png
    DIR/annotations/instances_val2017.json     DIR/val2017/*.png

Each image holds a few overlapping shapes (the shapes of the pretraining demo set, :mod:`pretrain.data.demo`,
filled with its textures in random colours) on a noisy gradient; the categories are the shapes. Annotations are
polygons of the *visible* part of each shape (traced from its mask after later shapes are drawn over it), with
COCO's ``area`` and ``bbox`` computed by pycocotools from those polygons.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pretrain.runtime.cli import ArgumentParser, run_cli, setup_logging
from pretrain.runtime.errors import SuiteError
from pretrain.runtime.io import staged_folder

__all__ = ["DEMO_SPLITS", "DataError", "DetDemoSpec", "check_coco_split", "coco_split_paths", "make_det_demo",
           "register_coco_split", "split_of_dataset"]

PROG = "python -m downstream.det.data"
DEMO_SPLITS = ("train2017", "val2017")
SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross")  # pretrain.data.demo.SHAPES (imports torch)
MIN_VISIBLE = 0.5  # an occluded shape keeps at least half of its area
MIN_TRACE_IOU = 0.85  # traced polygons must reproduce the visible mask this well
EXAMPLES = 3


class DataError(SuiteError):
    """A COCO folder, annotation file or image that is missing or malformed (one line)."""


@dataclasses.dataclass(frozen=True)
class DetDemoSpec:
    """What :func:`make_det_demo` draws (saved in each annotation file's ``info``)."""

    train_images: int = 96
    val_images: int = 24
    image_size: int = 128
    categories: tuple[str, ...] = ("circle", "triangle", "star")
    max_objects: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in SHAPE_NAMES]
        if unknown or not self.categories:
            raise ValueError(f"categories must be shapes among {', '.join(SHAPE_NAMES)}; got {list(self.categories)}")
        if min(self.train_images, self.val_images, self.max_objects) < 1 or self.image_size < 64:
            raise ValueError("needs at least 1 image per split, 1 object per image and 64 px images")


def _random_fill(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random texture of the pretraining demo in two random colours, float ``(size, size, 3)``."""
    from pretrain.data.demo import TEXTURES

    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    turn = rng.uniform(0, np.pi)
    u, v = np.cos(turn) * cols + np.sin(turn) * rows, np.cos(turn) * rows - np.sin(turn) * cols
    pattern = TEXTURES[rng.choice(sorted(TEXTURES))](u, v, rng.uniform(6, 12))
    dark = rng.uniform(0, 128, 3)
    return np.where(pattern[..., None], dark + rng.uniform(90, 128, 3), dark)


def _backdrop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A noisy two-colour gradient, float ``(size, size, 3)``."""
    ramp = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    low, high = rng.uniform(0, 255, (2, 3))
    return low + (high - low) * ramp + rng.normal(0, 10, (size, size, 3))


def _outline(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Corner points of ``shape`` rotated, scaled and placed at random inside the image, ``(K, 2)`` as (x, y)."""
    from pretrain.data.demo import SHAPES

    turn = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    radius = rng.uniform(0.12, 0.26) * size
    centre = rng.uniform(radius, size - radius, 2)
    return SHAPES[shape] @ rotation.T * radius + centre


def _fill_mask(points: np.ndarray, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=1)
    return np.asarray(canvas, dtype=bool)


def _trace(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat x, y lists in pixel coordinates) of the outer contours of a binary mask."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, name="serial", line_type="Separate").lines(0.5)
    polygons = []
    for line in lines:  # closed: the last point repeats the first
        x, y = line[:, 0], line[:, 1]
        if len(line) >= 4 and np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0:  # outer boundary (holes turn the other way)
            # (col, row) of the padded array -> image coordinates: -1 for the pad, +0.5 to the pixel centre
            polygons.append([round(float(v), 2) for v in (line[:-1] - 0.5).reshape(-1)])
    return polygons


def _rle(polygons: list[list[float]], size: int) -> dict:
    from pycocotools import mask as mask_util

    return mask_util.merge(mask_util.frPyObjects(polygons, size, size))


def _scene(rng: np.random.Generator, spec: DetDemoSpec) -> tuple[Image.Image, list[tuple[int, list, np.ndarray]]]:
    """One image and its objects ``(category index, polygons, visible mask)``, drawn back to front."""
    from pycocotools import mask as mask_util

    size = spec.image_size
    image = _backdrop(rng, size)
    placed: list[tuple[int, np.ndarray]] = []  # (category, full mask)
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        category = int(rng.integers(len(spec.categories)))
        mask = _fill_mask(_outline(rng, spec.categories[category], size), size)
        visible = [full & ~mask for _, full in placed]  # earlier masks once this one is drawn over them
        if any(v.sum() < MIN_VISIBLE * full.sum() for v, (_, full) in zip(visible, placed)):
            continue  # would hide too much of an earlier shape: leave it out
        image = np.where(mask[..., None], _random_fill(rng, size), image)
        placed = [(c, v) for (c, _), v in zip(placed, visible)] + [(category, mask)]
    objects = []
    for category, visible in placed:
        polygons = _trace(visible)
        traced = mask_util.decode(_rle(polygons, size)).astype(bool) if polygons else np.zeros_like(visible)
        iou = (traced & visible).sum() / max((traced | visible).sum(), 1)
        if iou >= MIN_TRACE_IOU:  # an occluded shape split so that polygons cannot trace it is left unlabelled
            objects.append((category, polygons, visible))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), objects


def _write_split(root: Path, split: str, count: int, spec: DetDemoSpec) -> None:
    from pycocotools import mask as mask_util

    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([spec.seed, DEMO_SPLITS.index(split), index])
        picture, objects = _scene(rng, spec)
        name = f"{index:06d}.png"
        picture.save(root / split / name)
        images.append({"id": index + 1, "file_name": name, "width": spec.image_size, "height": spec.image_size})
        for category, polygons, _ in objects:
            rle = _rle(polygons, spec.image_size)
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": category + 1,
                "segmentation": polygons, "area": float(mask_util.area(rle)),
                "bbox": [round(float(v), 2) for v in mask_util.toBbox(rle)], "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(spec.categories)]
    info = {"description": "SparK suite detection demo set", **dataclasses.asdict(spec)}
    document = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))


def make_det_demo(root: str | os.PathLike, spec: DetDemoSpec | None = None, overwrite: bool = False) -> Path:
    """Write the demo set (module docstring) to ``root`` and return it; byte-for-byte deterministic per spec.

    Written to a temporary sibling folder and renamed into place. ``FileExistsError`` if ``root`` is a
    non-empty folder and not ``overwrite``.
    """
    spec = spec or DetDemoSpec()
    with staged_folder(root, overwrite) as tmp:
        (tmp / "annotations").mkdir()
        for split, count in zip(DEMO_SPLITS, (spec.train_images, spec.val_images)):
            _write_split(tmp, split, count, spec)
    return Path(root).expanduser().absolute()


def coco_split_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(annotations/instances_<split>.json, <split>/)`` of a standard COCO layout under ``root``."""
    root = Path(root).expanduser()
    return root / "annotations" / f"instances_{split}.json", root / split


def check_coco_split(json_file: str | os.PathLike, image_root: str | os.PathLike) -> dict:
    """Validate a COCO instances file and its image folder; returns ``{"images", "annotations", "categories"}``
    counts. Raises :class:`DataError` naming the missing folder, file or images, or the malformed file."""
    json_file, image_root = Path(json_file), Path(image_root)
    if not json_file.parent.parent.is_dir():
        raise DataError(f"COCO folder not found: {json_file.parent.parent}")
    if not json_file.is_file():
        raise DataError(f"annotation file not found: {json_file}")
    if not image_root.is_dir():
        raise DataError(f"image folder not found: {image_root}")
    try:
        document = json.loads(json_file.read_text())
        counts = {key: len(document[key]) for key in ("images", "annotations", "categories")}
        names = [image["file_name"] for image in document["images"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{json_file} is not a COCO instances file: {type(error).__name__}: {error}") from error
    present = set(os.listdir(image_root))
    missing = [n for n in names if n not in present and not (image_root / n).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(names)} images listed in {json_file} are missing from {image_root} "
                        f"(e.g. {', '.join(missing[:EXAMPLES])})")
    return counts


_COCO_NAME = re.compile(r"coco_(?P<year>\d{4})_(?P<split>train|val)")


def split_of_dataset(name: str) -> str:
    """COCO split folder of a Detectron2 dataset name: ``coco_2017_train`` -> ``train2017``; DataError otherwise."""
    match = _COCO_NAME.fullmatch(name)
    if not match:
        raise DataError(f"dataset {name!r} is not a COCO instances split (coco_<year>_train or coco_<year>_val)")
    return f"{match['split']}{match['year']}"


def register_coco_split(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike) -> None:
    """Register (or re-register) COCO instances ``name`` in Detectron2's catalogs (after :func:`check_coco_split`)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(image_root))


def _make_demo(args: argparse.Namespace) -> None:
    spec = DetDemoSpec(args.train_images, args.val_images, args.image_size, seed=args.seed)
    try:
        root = make_det_demo(args.dir, spec, overwrite=args.force)
    except FileExistsError as error:
        raise FileExistsError(f"{error}; add --force to replace it") from error
    counts = {split: check_coco_split(*coco_split_paths(root, split)) for split in DEMO_SPLITS}
    print(f"wrote {root}: " + "; ".join(f"{split} {c['images']} images, {c['annotations']} instances"
                                        for split, c in counts.items()) + f" of {len(spec.categories)} categories")


def _check(args: argparse.Namespace) -> None:
    counts = check_coco_split(*coco_split_paths(args.dir, args.split))
    print(f"{args.dir} {args.split}: {counts['images']} images, {counts['annotations']} instances, "
          f"{counts['categories']} categories")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="COCO-layout data for the detection stage.")
    tools = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    defaults = DetDemoSpec()
    demo = tools.add_parser("make-demo", help="draw the embedded detection demo set (COCO layout) into DIR",
                            description="Draw a small deterministic instance-segmentation set (a few overlapping "
                                        "shapes per image, polygons of their visible parts) in the standard COCO "
                                        "layout: DIR/annotations/instances_{train,val}2017.json, "
                                        "DIR/{train,val}2017/*.png.")
    demo.add_argument("dir", metavar="DIR", type=Path, help="output folder")
    for flag, default, text in (("--train-images", defaults.train_images, "training images"),
                                ("--val-images", defaults.val_images, "validation images"),
                                ("--image-size", defaults.image_size, "image side in pixels (at least 64)"),
                                ("--seed", defaults.seed, "random seed")):
        demo.add_argument(flag, type=int, default=default, metavar="N", help=f"{text} (default {default})")
    demo.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    demo.set_defaults(run=_make_demo)
    check = tools.add_parser("check", help="validate a COCO split as training and evaluation do")
    check.add_argument("dir", metavar="DIR", type=Path, help="COCO root (annotations/, <split>/)")
    check.add_argument("--split", default="val2017", help="split name (default val2017)")
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        try:
            args.run(args)
        except ValueError as error:  # DetDemoSpec's bounds
            raise DataError(str(error)) from error

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
