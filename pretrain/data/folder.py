"""Image folders (ImageNet layout or flat) that validate up front and never crash on a corrupt file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..runtime.errors import SuiteError
from .transforms import PRETRAIN_SCALE, eval_transform, pretrain_transform

__all__ = [
    "Batch",
    "DataError",
    "ImageFolderDataset",
    "build_eval_dataset",
    "build_pretrain_dataset",
    "collate_skip_corrupt",
    "load_rgb",
]

logger = logging.getLogger(__name__)

UNLABELLED = -1  # label of every image of a flat folder


class DataError(SuiteError, ValueError):
    """A data path that cannot feed a run: missing, not a folder, no image files, or no decodable image."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    """Image files anywhere below ``folder``, sorted, following symlinks (as torchvision's ImageFolder)."""
    found = [
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(folder, followlinks=True)
        for name in names
        if _is_image(name)
    ]
    return sorted(found)


def _scan(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)``: ImageNet layout if sub-folders hold images, else the flat folder's images."""
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    classes = [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
    top_level = [entry.path for entry in entries if entry.is_file() and _is_image(entry.name)]
    samples = [(path, label) for label, name in enumerate(classes) for path in _images_under(root / name)]
    if samples:
        if top_level:
            logger.warning("%s: ignoring %d image files next to the class folders", root, len(top_level))
        return samples, classes
    if not top_level:
        raise DataError(f"no image files ({' '.join(IMG_EXTENSIONS)}) in {root}")
    return [(path, UNLABELLED) for path in top_level], []


def load_rgb(path: str | os.PathLike) -> Image.Image | None:
    """Decode ``path`` as an RGB PIL image; on any decoding failure log a warning naming it and return None."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises many types for broken files; none may stop a run
        logger.warning("skipping unreadable image %s: %s", path, error)
        return None


class ImageFolderDataset(Dataset):
    """Images of an ImageNet-layout folder (``root/<class>/**/*.jpg``) or of a flat folder (``root/*.jpg``).

    Files are listed once, in sorted order; extensions are torchvision's ``IMG_EXTENSIONS``, case-insensitive;
    hidden files and folders are ignored. ``dataset[i]`` is ``(transform(image), label)`` with ``label`` the
    index of the class folder in ``classes`` (sorted names) or ``-1`` for a flat folder, or ``None`` when the
    file cannot be decoded (a warning names it); batch with :func:`collate_skip_corrupt`.

    Raises :class:`DataError` if ``root`` is missing, not a folder, or holds no image file.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.samples, self.classes = _scan(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        image = load_rgb(path)
        if image is None:
            return None
        return (self.transform(image) if self.transform is not None else image), label

    def check_readable(self) -> int:
        """Index of the first file that decodes, opening files in order; :class:`DataError` if none does."""
        for index, (path, _) in enumerate(self.samples):
            if load_rgb(path) is not None:
                return index
        raise DataError(f"none of the {len(self.samples)} image files in {self.root} can be decoded")


def build_pretrain_dataset(
    path: str | os.PathLike, input_size: int, scale: tuple[float, float] = PRETRAIN_SCALE
) -> ImageFolderDataset:
    """Validated dataset of ``path`` with the paper's pretraining augmentation (items ``(3, S, S)``, label)."""
    dataset = ImageFolderDataset(path, pretrain_transform(input_size, scale))
    dataset.check_readable()
    return dataset


def build_eval_dataset(path: str | os.PathLike, input_size: int) -> ImageFolderDataset:
    """Validated dataset of ``path`` with the deterministic resize + center-crop view (for figures)."""
    dataset = ImageFolderDataset(path, eval_transform(input_size))
    dataset.check_readable()
    return dataset


class Batch(NamedTuple):
    """A collated batch: ``images`` ``(B', 3, H, W)``, ``labels`` int64 ``(B',)`` (-1 = unlabelled),
    and ``num_skipped`` = how many of the B samples were unreadable (``B' = B - num_skipped``)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_skipped: int


def collate_skip_corrupt(samples: Sequence[tuple[torch.Tensor, int] | None]) -> Batch:
    """``DataLoader`` ``collate_fn`` that drops unreadable samples (``None``) and counts them.

    Returns :class:`Batch` ``(images, labels, num_skipped)``, which unpacks as a 3-tuple. If every sample
    was unreadable, ``images`` and ``labels`` are empty (``len(images) == 0``): the loop should skip the step.
    """
    kept = [sample for sample in samples if sample is not None]
    num_skipped = len(samples) - len(kept)
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), num_skipped)
    images, labels = default_collate(kept)
    return Batch(images, labels, num_skipped)
