"""Detection demo data (deterministic COCO layout, valid polygons), COCO folder checks, and the evaluation path:
the ground truth evaluated as predictions scores AP 100 through the code that evaluates models."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from downstream.det.config import adapt_to_run, load_config
from downstream.det.data import (
    SHAPE_NAMES,
    DataError,
    DetDemoSpec,
    check_coco_split,
    coco_split_paths,
    main,
    make_det_demo,
    register_coco_split,
    split_of_dataset,
)
from downstream.det.evaluation import GroundTruthPredictor, det_metrics, evaluate_coco

SPEC = DetDemoSpec(train_images=6, val_images=6, image_size=96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_det_demo(tmp_path_factory.mktemp("det") / "demo", SPEC)


def test_demo_is_a_deterministic_coco_instance_set_with_polygon_masks(demo, tmp_path):
    from pretrain.data.demo import SHAPES

    assert tuple(SHAPES) == SHAPE_NAMES  # the categories are the pretraining demo's shapes
    again = make_det_demo(tmp_path / "again", SPEC)
    for split in ("train2017", "val2017"):
        json_file, images = coco_split_paths(demo, split)
        assert json_file.read_bytes() == coco_split_paths(again, split)[0].read_bytes()
        assert [p.read_bytes() for p in sorted(images.iterdir())] == [
            p.read_bytes() for p in sorted(coco_split_paths(again, split)[1].iterdir())]
        coco = COCO(str(json_file))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SPEC.categories)
        annotations = coco.loadAnns(coco.getAnnIds())
        per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
        assert max(per_image) >= 2 and len(annotations) >= len(per_image)
        for ann in annotations:
            assert isinstance(ann["segmentation"], list) and all(len(p) >= 6 for p in ann["segmentation"])
            mask = coco.annToMask(ann)
            assert mask.sum() == pytest.approx(ann["area"], rel=0.02) and ann["area"] > 20
            x, y, w, h = ann["bbox"]
            rows, cols = np.nonzero(mask)
            assert cols.min() >= int(x) and cols.max() < x + w + 1 and rows.min() >= int(y) and rows.max() < y + h + 1
    overlapping = 0
    coco = COCO(str(coco_split_paths(demo, "train2017")[0]))
    for image_id in coco.getImgIds():
        boxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
        overlapping += int((mask_util.iou(boxes, boxes, [0] * len(boxes)) > 0).sum() > len(boxes))
    assert overlapping >= 1  # some shapes overlap one another


def test_cli_writes_the_layout_and_refuses_to_overwrite(tmp_path, capsys):
    argv = ["make-demo", str(tmp_path / "d"), "--train-images", "2", "--val-images", "1", "--image-size", "64"]
    assert main(argv) == 0
    assert "train2017 2 images" in capsys.readouterr().out
    assert (tmp_path / "d/annotations/instances_val2017.json").is_file()
    assert len(list((tmp_path / "d/train2017").iterdir())) == 2
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "add --force" in err and len(err.splitlines()) == 1


def test_coco_folder_problems_are_named(demo, tmp_path):
    broken = tmp_path / "coco"
    shutil.copytree(demo, broken)
    with pytest.raises(DataError, match="COCO folder not found"):
        check_coco_split(*coco_split_paths(tmp_path / "nowhere", "val2017"))
    with pytest.raises(DataError, match="annotation file not found: .*instances_test2017.json"):
        check_coco_split(*coco_split_paths(broken, "test2017"))
    (broken / "val2017" / "000002.png").unlink()
    with pytest.raises(DataError, match=r"1 of 6 images listed in .* are missing from .*val2017 \(e.g. 000002.png\)"):
        check_coco_split(*coco_split_paths(broken, "val2017"))
    (broken / "annotations" / "instances_train2017.json").write_text('{"images": []')
    with pytest.raises(DataError, match="is not a COCO instances file"):
        check_coco_split(*coco_split_paths(broken, "train2017"))
    assert split_of_dataset("coco_2017_val") == "val2017"
    with pytest.raises(DataError, match="not a COCO instances split"):
        split_of_dataset("lvis_v1_val")


def test_ground_truth_as_predictions_scores_ap_100_through_the_evaluation_path(demo, tmp_path):
    register_coco_split("det_test_gt_val", *coco_split_paths(demo, "val2017"))
    cfg = load_config("tiny", ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"])
    adapt_to_run(cfg, 1, "cpu")
    results = evaluate_coco(cfg, GroundTruthPredictor("det_test_gt_val"), "det_test_gt_val", str(tmp_path))
    metrics = det_metrics(results)
    for task in ("bbox", "segm"):
        assert metrics[f"{task}_AP"] == metrics[f"{task}_AP50"] == metrics[f"{task}_AP75"] == 100.0
    assert metrics["bbox_APl"] is None  # no large objects in 96 px images: COCO's -1, Detectron2's NaN
    predictions = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert len(predictions) == len(json.loads(coco_split_paths(demo, "val2017")[0].read_text())["annotations"])
