"""A small, deterministic, procedurally drawn labelled image set in ImageNet layout, for demos and tests.

Each class is a (shape, texture) pair, e.g. ``star-checker``: a rotated, scaled, randomly placed shape filled
with a randomly coloured texture on a varied background. Colours are random per image, so only shape and
texture tell the classes apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from ..runtime.io import staged_folder

__all__ = [
    "CLASSES",
    "DemoSpec",
    "default_demo_root",
    "ensure_demo_data",
    "make_demo_dataset",
    "render_demo_image",
]

DEMO_ENV = "SPARK_DEMO_DATA"
MANIFEST = "demo.json"
SPLITS = ("train", "val")
PALETTE_COLOURS = 64  # images are stored as palette PNGs: small files, exact bytes


def _regular(corners: int, inner: float | None = None) -> np.ndarray:
    """Unit polygon with ``corners`` corners (a star when ``inner`` gives the radius of its notches)."""
    count = corners * 2 if inner else corners
    angles = np.arange(count) * 2 * np.pi / count
    radii = np.where(np.arange(count) % 2 == 0, 1.0, inner) if inner else np.ones(count)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


_CROSS = np.array(
    [(-1, -0.3), (-0.3, -0.3), (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3),
     (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3)],
    dtype=float,
)  # fmt: skip

SHAPES: Mapping[str, np.ndarray] = MappingProxyType({
    "circle": _regular(48),
    "square": _regular(4) / np.sqrt(2) * 1.25,
    "triangle": _regular(3),
    "star": _regular(5, inner=0.42),
    "cross": _CROSS,
})
for _outline in SHAPES.values():
    _outline.setflags(write=False)

# Texture patterns: f(u, v, period) -> bool map, on texture coordinates (pixels, rotated at random).
TEXTURES: Mapping[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = MappingProxyType({
    "stripes": lambda u, v, p: (u // (p / 2)) % 2 == 0,
    "checker": lambda u, v, p: ((u // (p / 2)) + (v // (p / 2))) % 2 == 0,
    "dots": lambda u, v, p: np.hypot(u % p - p / 2, v % p - p / 2) < 0.3 * p,
    "plain": lambda u, v, p: np.ones_like(u, dtype=bool),
})

CLASSES: tuple[str, ...] = tuple(f"{shape}-{texture}" for shape in SHAPES for texture in TEXTURES)


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """What :func:`make_demo_dataset` draws; saved as ``demo.json`` in the data set's folder."""

    num_classes: int = 8
    train_per_class: int = 64
    val_per_class: int = 16
    image_size: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in 1..{len(CLASSES)}, got {self.num_classes}")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ValueError("train_per_class and val_per_class must be at least 1")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")

    @property
    def classes(self) -> tuple[str, ...]:
        """Class folder names, in label order."""
        return CLASSES[: self.num_classes]

    def per_class(self, split: str) -> int:
        """Images per class in ``split`` ('train' or 'val')."""
        return {"train": self.train_per_class, "val": self.val_per_class}[split]


def _colour_pair(rng: np.random.Generator) -> np.ndarray:
    """Two random RGB colours that differ clearly in every channel, ``(2, 3)``."""
    first = rng.uniform(0, 256, 3)
    second = (first + rng.uniform(80, 176, 3)) % 256
    return np.stack([first, second])


def _background(rng: np.random.Generator, size: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Random two-colour gradient plus blocky noise, float ``(size, size, 3)``."""
    ys, xs = grid
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(angle) * xs + np.sin(angle) * ys) / size + 1) / 2
    start, end = rng.uniform(0, 256, (2, 3))
    block = 4
    coarse = rng.normal(0, 12, (-(-size // block), -(-size // block), 3))
    noise = np.kron(coarse, np.ones((block, block, 1)))[:size, :size]
    return start + (end - start) * ramp[..., None] + noise


def _clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """A few random lines on the background, so the object is not the only structure in the image."""
    draw, size = ImageDraw.Draw(canvas), canvas.size[0]
    for _ in range(rng.integers(2, 6)):
        ends = rng.uniform(0, size, 4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line(tuple(ends), fill=colour, width=int(rng.integers(1, 4)))


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    """Binary ``L`` mask of ``shape`` rotated, scaled and placed at random."""
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    radius = rng.uniform(0.22, 0.38) * size
    centre = rng.uniform(0.35, 0.65, 2) * size
    corners = SHAPES[shape] @ rotation.T * radius + centre
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon([tuple(point) for point in corners], fill=255)
    return mask


def _texture(rng: np.random.Generator, texture: str, size: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``texture`` in two random colours, random period and orientation, float ``(size, size, 3)``."""
    ys, xs = grid
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xs + np.sin(angle) * ys
    v = -np.sin(angle) * xs + np.cos(angle) * ys
    period = rng.uniform(0.06, 0.12) * size
    on, off = _colour_pair(rng)
    return np.where(TEXTURES[texture](u, v, period)[..., None], on, off)


def render_demo_image(class_name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size x size`` palette image of ``class_name`` ('shape-texture'), all randomness from ``rng``."""
    shape, texture = class_name.split("-")
    grid = np.mgrid[0:size, 0:size].astype(np.float64)
    background = Image.fromarray(np.clip(_background(rng, size, grid), 0, 255).astype(np.uint8))
    _clutter(rng, background)
    mask = _shape_mask(rng, shape, size)
    foreground = Image.fromarray(np.clip(_texture(rng, texture, size, grid), 0, 255).astype(np.uint8))
    image = Image.composite(foreground, background, mask)
    return image.quantize(PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)


def _write_split(folder: Path, split: str, spec: DemoSpec) -> None:
    for class_index, class_name in enumerate(spec.classes):
        class_dir = folder / split / class_name
        class_dir.mkdir(parents=True)
        for index in range(spec.per_class(split)):
            rng = np.random.default_rng([spec.seed, SPLITS.index(split), class_index, index])
            render_demo_image(class_name, spec.image_size, rng).save(class_dir / f"{class_name}_{index:04d}.png")


def make_demo_dataset(
    root: str | os.PathLike,
    num_classes: int = DemoSpec.num_classes,
    train_per_class: int = DemoSpec.train_per_class,
    val_per_class: int = DemoSpec.val_per_class,
    image_size: int = DemoSpec.image_size,
    seed: int = DemoSpec.seed,
    overwrite: bool = False,
) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` plus ``root/demo.json``; return ``root``.

    Byte-for-byte deterministic for a given spec (each image draws from its own seed ``[seed, split, class,
    index]``). The set is written to a temporary sibling folder and renamed into place, so an interrupted run
    never leaves a partial ``root``. Raises ``FileExistsError`` if ``root`` is non-empty and not ``overwrite``.
    """
    spec = DemoSpec(num_classes, train_per_class, val_per_class, image_size, seed)
    with staged_folder(root, overwrite) as tmp:
        for split in SPLITS:
            _write_split(tmp, split, spec)
        manifest = {**dataclasses.asdict(spec), "classes": sorted(spec.classes)}  # label order of the folders
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(root).expanduser().absolute()


def default_demo_root() -> Path:
    """``$SPARK_DEMO_DATA`` if set, else ``~/.cache/spark-suite/demo-data``."""
    return Path(os.environ.get(DEMO_ENV) or Path.home() / ".cache" / "spark-suite" / "demo-data").expanduser()


def ensure_demo_data(root: str | os.PathLike | None = None, spec: DemoSpec | None = None) -> Path:
    """Return the demo set at ``root`` (default :func:`default_demo_root`), drawing it with ``spec`` if missing.

    An existing set is reused as it is, whatever spec drew it (see its ``demo.json``).
    """
    root = Path(root).expanduser() if root is not None else default_demo_root()
    if (root / MANIFEST).is_file():
        return root
    spec = spec or DemoSpec()
    try:
        make_demo_dataset(root, **dataclasses.asdict(spec))
    except OSError:  # FileExistsError included
        if not (root / MANIFEST).is_file():  # not another process that finished first
            raise
    return root


def demo_data_for_run(is_main: bool) -> Path:
    """The embedded demo set (``--data demo``) for a run of one or several ranks: the main rank draws it if it is
    missing while the others wait, then every rank gets its root (``train/``, ``val/``)."""
    from ..runtime.distributed import barrier

    if is_main:
        ensure_demo_data()
    barrier()
    return ensure_demo_data()
