"""Image transforms: the paper's minimal pretraining augmentation and a deterministic view for figures."""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

__all__ = ["PRETRAIN_SCALE", "denormalize", "eval_transform", "pretrain_transform"]

PRETRAIN_SCALE = (0.67, 1.0)  # RandomResizedCrop area range of the published SparK recipe (section 4.1)


def _to_normalised_tensor() -> list:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]


def pretrain_transform(input_size: int, scale: tuple[float, float] = PRETRAIN_SCALE) -> transforms.Compose:
    """Random resized crop (bicubic), horizontal flip, ImageNet normalisation: PIL image -> ``(3, S, S)``.

    Section 4.1: "only the minimal augmentation is required (random cropping and horizontal flipping)".
    """
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    crop = transforms.RandomResizedCrop(
        input_size, scale=(low, high), interpolation=transforms.InterpolationMode.BICUBIC
    )
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(), *_to_normalised_tensor()])


def eval_transform(input_size: int) -> transforms.Compose:
    """Resize the short side to ``input_size`` (bicubic), center crop, normalise: PIL -> ``(3, S, S)``."""
    resize = transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC)
    return transforms.Compose([resize, transforms.CenterCrop(input_size), *_to_normalised_tensor()])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of ``(..., 3, H, W)`` images and clamp to ``[0, 1]``."""
    mean = images.new_tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
