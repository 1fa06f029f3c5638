"""Data of a fine-tuning run: the ImageNet-layout root (``train/`` and ``val/``), timm's transforms, the samplers.

Folders are read by :class:`pretrain.data.ImageFolderDataset` (validated up front, corrupt images skipped and
counted by :func:`pretrain.data.collate_skip_corrupt`). Transforms come from ``timm.data.create_transform``;
``aa: trivialaugment-wide`` swaps in torchvision's ``TrivialAugmentWide`` where timm's automatic augmentation
would sit, as the published SparK code does below 384 px.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import transforms

from pretrain.data import DataError, ImageFolderDataset, collate_skip_corrupt
from pretrain.runtime.distributed import DistEnv

from .config import ClsConfig

__all__ = ["TRIVIAL_AUGMENT", "ClsData", "build_data", "eval_loader", "eval_transform", "train_sampler",
           "train_transform"]

TRIVIAL_AUGMENT = "trivialaugment-wide"
SPLITS = ("train", "val")


def train_transform(cfg: ClsConfig) -> Callable:
    """timm's training transform of ``cfg``: RandomResizedCrop, flip, automatic augmentation, normalisation,
    random erasing."""
    trivial = cfg.aa == TRIVIAL_AUGMENT
    kwargs = dict(input_size=cfg.input_size, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
                  color_jitter=cfg.color_jitter or None, auto_augment=None if trivial else cfg.aa,
                  interpolation=cfg.interpolation, re_prob=cfg.reprob, re_mode=cfg.remode)
    if not trivial:
        return create_transform(**kwargs)
    primary, _, final = create_transform(**kwargs, separate=True)
    mode = transforms.InterpolationMode(cfg.interpolation)
    return transforms.Compose([*primary.transforms, transforms.TrivialAugmentWide(interpolation=mode),
                               *final.transforms])


def eval_transform(cfg: ClsConfig) -> Callable:
    """timm's test transform of ``cfg``: resize to ``input_size / crop_pct``, crop ``input_size``, normalise."""
    return create_transform(input_size=cfg.input_size, is_training=False, interpolation=cfg.interpolation,
                            crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)


@dataclass(frozen=True)
class ClsData:
    """The validated splits of a data root: ``train`` is None for ``--eval-only`` runs without one."""

    root: str
    train: ImageFolderDataset | None
    val: ImageFolderDataset
    classes: tuple[str, ...]


def _split(root: Path, name: str, transform: Callable) -> ImageFolderDataset:
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"{root} has no {name}/ folder: --data needs a root with train/ and val/ in ImageNet layout")
    dataset = ImageFolderDataset(folder, transform)
    if not dataset.classes:
        raise DataError(f"{folder} holds images but no class sub-folders (ImageNet layout: {name}/<class>/*.jpg)")
    dataset.check_readable()
    return dataset


def _check_same_classes(train: ImageFolderDataset, val: ImageFolderDataset) -> None:
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    shown = "; ".join(f"only in {where}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                      for where, names in (("train/", only_train), ("val/", only_val)) if names)
    raise DataError(f"val/ classes differ from train/ ({len(val.classes)} vs {len(train.classes)} classes; "
                    f"{shown or 'same names'})")


def build_data(cfg: ClsConfig, need_train: bool = True, root: str | os.PathLike | None = None) -> ClsData:
    """The splits of ``root`` (default ``cfg.data``) with their transforms; :class:`DataError` (one line) for a
    missing root or split, a split without class folders or decodable images, or val/ classes that differ from
    train/'s.

    Without ``need_train`` (evaluation only) train/ is optional, read only to check the classes when present.
    """
    if not (root or cfg.data):
        raise DataError("--data is required: a root with train/ and val/ in ImageNet layout")
    root = Path(root or cfg.data)
    if not root.is_dir():
        raise DataError(f"data root {'is not a folder' if root.exists() else 'does not exist'}: {root}")
    val = _split(root, "val", eval_transform(cfg))
    train = _split(root, "train", train_transform(cfg)) if need_train or (root / "train").is_dir() else None
    if train is not None:
        _check_same_classes(train, val)
    return ClsData(os.fspath(root), train, val, tuple(val.classes))


def train_sampler(dataset: ImageFolderDataset, cfg: ClsConfig, env: DistEnv) -> Sampler:
    """Repeated augmentation (timm's ``RepeatAugSampler``, ``aug_repeats`` copies) or a shuffled
    ``DistributedSampler`` that drops the tail; both reshuffle per epoch (``set_epoch``)."""
    if cfg.aug_repeats:
        return RepeatAugSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                num_repeats=cfg.aug_repeats)
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed,
                              drop_last=True)


def eval_loader(dataset: ImageFolderDataset, cfg: ClsConfig, env: DistEnv) -> DataLoader:
    """This rank's share of ``dataset`` (every ``world_size``-th image, none twice, none dropped), in order."""
    batch = cfg.eval_batch_size or 2 * cfg.batch_size
    return DataLoader(dataset, batch_size=batch, sampler=list(range(env.rank, len(dataset), env.world_size)),
                      num_workers=cfg.workers, collate_fn=collate_skip_corrupt, pin_memory=env.device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.seed))
