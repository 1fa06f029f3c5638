"""Training augmentation and mapper: Detectron2's, plus the two-branch scheme of the published ConvNeXt config.

The published SparK ConvNeXt Mask R-CNN 3x config (``downstream_mmdet/configs/convnext_spark/``, taken from the
ConvNeXt repository's ``mask_rcnn_convnext_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco_in1k.py``; the
scheme comes from DETR) trains on one of two branches per image, each chosen half the time (MMDetection's
``AutoAugment`` draws a policy uniformly):

(a) resize the short side to one of ``INPUT.MIN_SIZE_TRAIN`` (480, 512, ..., 800), the long side at most
    ``INPUT.MAX_SIZE_TRAIN`` (1333), keeping the aspect ratio;
(b) resize the short side to one of ``INPUT.CROP_BRANCH.MIN_SIZE`` (400, 500, 600; same long-side limit), crop a
    random region of ``INPUT.CROP_BRANCH.TYPE`` / ``SIZE`` (``absolute_range`` 384..600 px per side; a crop may keep
    no object, MMDetection's ``allow_negative_crop``), then resize as in (a);

then a random horizontal flip (``INPUT.RANDOM_FLIP``; the order of flip and resize does not change what is
drawn). ``INPUT.CROP_BRANCH.ENABLED False`` keeps Detectron2's own augmentation, as its ``DatasetMapper`` builds it
(``INPUT.CROP`` when enabled, then ``detection_utils.build_augmentation``: resize, flip).

Cropping polygon masks needs ``shapely``, which Detectron2 0.6 imports for it; MMDetection crops bitmaps
(``LoadAnnotations(poly2mask=True)``). With ``INPUT.MASK_FORMAT bitmask`` the mapper rasterises the polygons at the
image's own size before augmenting (:class:`DetDatasetMapper`), so masks are resized and cropped as pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from pycocotools import mask as mask_util

from pretrain.runtime.errors import UsageError

__all__ = ["DetDatasetMapper", "RandomBranch", "build_train_augmentation", "build_train_mapper"]


class RandomBranch(T.Augmentation):
    """Applies one of several augmentation sequences, branch ``i`` with probability ``probs[i]``."""

    def __init__(self, branches: Sequence[Sequence[T.Augmentation]], probs: Sequence[float]) -> None:
        super().__init__()
        if len(branches) != len(probs) or not branches or abs(sum(probs) - 1) > 1e-6 or min(probs) < 0:
            raise ValueError(f"RandomBranch needs one probability per branch, summing to 1; got {list(probs)}")
        self.branches = [T.AugmentationList(list(branch)) for branch in branches]
        self.probs = list(probs)

    def __call__(self, aug_input: T.AugInput) -> T.Transform:
        """Augment ``aug_input`` in place with one branch (drawn from NumPy's generator, as Detectron2's
        augmentations draw); returns the transforms applied."""
        index = int(np.random.choice(len(self.branches), p=self.probs))
        return self.branches[index](aug_input)

    def __repr__(self) -> str:
        return f"RandomBranch({', '.join(f'{p:g}: {b}' for p, b in zip(self.probs, self.branches))})"

    __str__ = __repr__


def build_train_augmentation(cfg: CfgNode) -> list[T.Augmentation]:
    """The training augmentation of ``cfg``: the two branches (module docstring) when ``INPUT.CROP_BRANCH.ENABLED``,
    else Detectron2's ``DatasetMapper``'s own (``INPUT.CROP`` if enabled, resize, flip)."""
    branch = cfg.INPUT.CROP_BRANCH
    if not branch.ENABLED:
        return DatasetMapper.from_config(cfg, is_train=True)["augmentations"]
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING != "choice":
        raise UsageError("INPUT.CROP_BRANCH needs INPUT.MIN_SIZE_TRAIN_SAMPLING choice (sizes drawn from a list)")
    if cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT != "bitmask":
        raise UsageError("INPUT.CROP_BRANCH crops masks: set INPUT.MASK_FORMAT bitmask (Detectron2 0.6 crops polygons "
                         "with shapely, which this suite does not install)")
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")
    crop = [T.ResizeShortestEdge(branch.MIN_SIZE, cfg.INPUT.MAX_SIZE_TRAIN, "choice"),
            T.RandomCrop(branch.TYPE, tuple(branch.SIZE)), resize]
    flip = cfg.INPUT.RANDOM_FLIP
    flips = [] if flip == "none" else [T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical")]
    return [RandomBranch([[resize], crop], [1 - branch.PROB, branch.PROB]), *flips]


def _polygons_to_rle(annotation: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list) and segmentation:
        annotation["segmentation"] = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    return annotation


class DetDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper``; with ``instance_mask_format`` bitmask, polygon annotations become RLE masks at
    the image's own size first, so transforms (crops included) act on pixels."""

    def _transform_annotations(self, dataset_dict: dict, transforms: Any, image_shape: tuple[int, int]) -> None:
        if self.instance_mask_format == "bitmask" and self.use_instance_mask:
            height, width = dataset_dict["height"], dataset_dict["width"]
            dataset_dict["annotations"] = [_polygons_to_rle(a, height, width) for a in dataset_dict["annotations"]]
        super()._transform_annotations(dataset_dict, transforms, image_shape)


def build_train_mapper(cfg: CfgNode) -> DetDatasetMapper:
    """The training mapper of ``cfg``: Detectron2's settings, with the two branches of
    :func:`build_train_augmentation` when ``INPUT.CROP_BRANCH.ENABLED``."""
    kwargs = DatasetMapper.from_config(cfg, is_train=True)
    if cfg.INPUT.CROP_BRANCH.ENABLED:
        kwargs["augmentations"] = build_train_augmentation(cfg)
    return DetDatasetMapper(**kwargs)
