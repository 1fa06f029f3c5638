"""The published ConvNeXt detection augmentation (downstream.det.augment) and the ConvNeXt Mask R-CNN 3x config end
to end: branch frequencies and sizes, masks that follow the image through resize and crop, and a short run on the
demo COCO set (weights with the stage norms left fresh, crop branch, bitmask masks, heads and norms, AP)."""

import importlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from downstream.det.augment import RandomBranch, build_train_augmentation, build_train_mapper
from downstream.det.config import load_config
from downstream.det.data import DetDemoSpec, make_det_demo
from downstream.det.train import run as train_run
from pretrain.runtime.errors import UsageError
from pretrain.runtime.result import read_result

# Detectron2 modules, imported after downstream.det has applied its compatibility shims
T = importlib.import_module("detectron2.data.transforms")
utils = importlib.import_module("detectron2.data.detection_utils")
structures = importlib.import_module("detectron2.structures")
DatasetMapper = importlib.import_module("detectron2.data").DatasetMapper

CONVNEXT = "mask_rcnn_convnext_base_FPN_3x"
SIZES_A = tuple(range(480, 801, 32))


def _sizes_after(augs, image: np.ndarray) -> tuple[tuple[int, int], list]:
    aug_input = T.AugInput(image)
    transforms = T.AugmentationList(augs)(aug_input)
    return aug_input.image.shape[:2], list(transforms)


def test_two_branches_are_drawn_half_the_time_with_the_published_sizes():
    cfg = load_config(CONVNEXT)
    augs = build_train_augmentation(cfg)
    assert isinstance(augs[0], RandomBranch) and isinstance(augs[1], T.RandomFlip)
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    np.random.seed(0)
    crops = 0
    for _ in range(200):
        (height, width), transforms = _sizes_after(augs, image)
        assert min(height, width) in SIZES_A and max(height, width) <= 1333
        cropped = [t for t in transforms if isinstance(t, T.CropTransform)]
        if cropped:
            crops += 1
            crop, before = cropped[0], transforms[0]
            assert min(before.new_h, before.new_w) in (400, 500, 600)  # resized first, then cropped
            assert 384 <= crop.h <= 600 and 384 <= crop.w <= min(600, before.new_w)
    assert 80 <= crops <= 120  # one branch or the other, evenly (200 draws: 100 +- 2.8 sigma)


@pytest.mark.parametrize(("prob", "expected"), [(0.0, 0), (1.0, 50)])
def test_branch_probability_is_the_configured_one(prob, expected):
    cfg = load_config(CONVNEXT, ["INPUT.CROP_BRANCH.PROB", str(prob)])
    augs = build_train_augmentation(cfg)
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    drawn = sum(any(isinstance(t, T.CropTransform) for t in _sizes_after(augs, image)[1]) for _ in range(50))
    assert drawn == expected
    with pytest.raises(ValueError, match="summing to 1"):
        RandomBranch([[], []], [0.5, 0.6])


def test_crop_branch_refuses_polygon_masks():
    cfg = load_config(CONVNEXT, ["INPUT.MASK_FORMAT", "polygon"])
    with pytest.raises(UsageError, match="INPUT.MASK_FORMAT bitmask"):
        build_train_augmentation(cfg)


@pytest.fixture()
def sample(tmp_path) -> dict:
    """A 96 x 160 (H x W) image with one triangle, as a Detectron2 dataset dict (not square: catches H/W swaps)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(path)
    polygon = [20.0, 10.0, 150.0, 30.0, 60.0, 90.0]
    return {"file_name": str(path), "height": 96, "width": 160, "image_id": 1, "annotations": [
        {"bbox": [20.0, 10.0, 130.0, 80.0], "bbox_mode": structures.BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0,
         "segmentation": [polygon]}]}


SMALL = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "1333", "INPUT.RANDOM_FLIP", "none"]


def test_bitmask_mapper_rasterises_polygons_where_detectron2_would(sample):
    mask_of = {}
    for fmt in ("bitmask", "polygon"):
        cfg = load_config(CONVNEXT, [*SMALL, "INPUT.CROP_BRANCH.ENABLED", "False", "INPUT.MASK_FORMAT", fmt])
        masks = build_train_mapper(cfg)(dict(sample))["instances"].gt_masks
        bitmasks = masks if isinstance(masks, structures.BitMasks) else structures.BitMasks.from_polygon_masks(
            masks, 96, 160)
        mask_of[fmt] = bitmasks.tensor
    assert mask_of["bitmask"].shape == (1, 96, 160) and mask_of["bitmask"].sum() > 1000
    assert torch.equal(mask_of["bitmask"], mask_of["polygon"])


def test_masks_follow_the_image_through_the_crop_branch(sample):
    cfg = load_config(CONVNEXT, [*SMALL, "INPUT.CROP_BRANCH.PROB", "1.0", "INPUT.CROP_BRANCH.MIN_SIZE", "(120,)",
                                 "INPUT.CROP_BRANCH.SIZE", "[48, 80]"])
    image = utils.read_image(sample["file_name"], format="RGB")
    full = utils.polygons_to_bitmask(sample["annotations"][0]["segmentation"], 96, 160)
    np.random.seed(3)
    mapped = build_train_mapper(cfg)(dict(sample))
    np.random.seed(3)
    aug_input = T.AugInput(image)
    transforms = T.AugmentationList(build_train_augmentation(cfg))(aug_input)
    crop = next(t for t in transforms if isinstance(t, T.CropTransform))
    assert 48 <= crop.h <= 80 and 48 <= crop.w <= 80
    assert torch.equal(mapped["image"], torch.as_tensor(aug_input.image.transpose(2, 0, 1).copy()))
    instances = mapped["instances"]
    assert len(instances) == 1  # a crop may miss the triangle (allow_negative_crop); this seed's does not
    assert instances.image_size == tuple(mapped["image"].shape[-2:]) and min(instances.image_size) == 96
    expected = transforms.apply_segmentation(full.astype(np.uint8))
    assert torch.equal(instances.gt_masks.tensor[0], torch.as_tensor(expected, dtype=torch.bool))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_det_demo(tmp_path_factory.mktemp("coco") / "demo", DetDemoSpec(8, 4, 64))


def test_convnext_config_trains_end_to_end_on_the_demo_set(coco, tmp_path):
    """ConvNeXt-Atto in the table-10 config at 64 px: the crop branch on every image, bitmask masks, stage norms
    fresh beside loaded timm weights, shared 2fc / 4conv heads without norm, two iterations, then COCO AP."""
    weights = tmp_path / "atto.pth"
    torch.save(timm.create_model("convnext_atto", num_classes=0).state_dict(), weights)
    out = tmp_path / "run"
    outcome = train_run([
        "--config", CONVNEXT, "--weights", str(weights), "--out", str(out), "--coco-root", str(coco), "--amp", "none",
        "MODEL.TIMM.NAME", "convnext_atto", "MODEL.ROI_HEADS.NUM_CLASSES", "3", "INPUT.MIN_SIZE_TRAIN", "(64, 80)",
        "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.CROP_BRANCH.PROB", "1.0", "INPUT.CROP_BRANCH.MIN_SIZE", "(48, 64)",
        "INPUT.CROP_BRANCH.SIZE", "[32, 48]", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0"])
    assert outcome.status == "completed"
    result = read_result(out)
    assert result.metrics["iterations"] == 2 and "segm_AP" in result.metrics
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert {f"backbone.bottom_up.norm{i}.weight" for i in range(4)} <= set(state)
    assert not any(k.startswith("roi_heads.box_head.conv") or ".norm." in k for k in state
                   if k.startswith(("roi_heads", "backbone.fpn")))


def test_without_the_crop_branch_the_mapper_keeps_detectron2s_own_augmentation_crop_included():
    """``INPUT.CROP.ENABLED True`` (the literal reading of table 9's crop) reaches the mapper, as Detectron2 has it."""
    cfg = load_config("mask_rcnn_R_50_FPN_1x", ["INPUT.CROP.ENABLED", "True"])
    ours = [type(a) for a in build_train_mapper(cfg).augmentations.augs]
    assert ours == [type(a) for a in DatasetMapper(cfg, is_train=True).augmentations.augs]
    assert ours[0] is T.RandomCrop
