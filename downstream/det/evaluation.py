"""COCO evaluation with pycocotools (boxes and masks), one code path for training, one-off evaluation and tests.

:func:`evaluate_coco` runs any predictor (a Detectron2 model, or :class:`GroundTruthPredictor`) over a registered
dataset through Detectron2's test loader, ``inference_on_dataset`` and ``COCOEvaluator`` with pycocotools' own
COCOeval (``use_fast_impl=False``: the fast C++ evaluator is not built here). Numbers are percentages, as
Detectron2 prints them; :func:`det_metrics` flattens them to the names of ``result.json``
(``bbox_AP``, ``bbox_AP50``, ..., ``segm_APl``), with ``None`` where COCO has no instance of a size range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools import mask as mask_util

__all__ = ["METRIC_NAMES", "GroundTruthPredictor", "det_metrics", "evaluate_coco", "format_table"]

logger = logging.getLogger(__name__)
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def evaluate_coco(cfg: CfgNode, predictor: Callable, dataset_name: str, out_dir: str | None) -> dict[str, Any]:
    """``{"bbox": {...}, "segm": {...}}`` of ``predictor`` on ``dataset_name`` (Detectron2's COCO results).

    ``out_dir`` receives ``coco_instances_results.json`` (the predictions) and ``instances_predictions.pth``.
    """
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    evaluator = COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=out_dir, use_fast_impl=False)
    loader = build_detection_test_loader(cfg, dataset_name)
    results = inference_on_dataset(predictor, loader, evaluator)
    if results:
        print_csv_format(results)
    return dict(results or {})


def det_metrics(results: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """Detectron2's COCO results -> ``{"bbox_AP": ..., "segm_APl": ...}`` (NaN -> None)."""
    metrics = {}
    for task in ("bbox", "segm"):
        for name in METRIC_NAMES:
            if task in results and name in results[task]:
                value = float(results[task][name])
                metrics[f"{task}_{name}"] = None if math.isnan(value) else round(value, 3)
    return metrics


def format_table(metrics: Mapping[str, float | None]) -> str:
    """The AP table as text (rows bbox/segm, columns AP, AP50, AP75, APs, APm, APl)."""
    lines = ["task  " + "".join(f"{name:>8}" for name in METRIC_NAMES)]
    for task in ("bbox", "segm"):
        if f"{task}_AP" in metrics:
            cells = [metrics.get(f"{task}_{name}") for name in METRIC_NAMES]
            lines.append(f"{task:<6}" + "".join(f"{'-' if v is None else format(v, '.2f'):>8}" for v in cells))
    return "\n".join(lines)


class GroundTruthPredictor:
    """A predictor that answers each image with its own annotations (score 1): evaluating it must give AP 100.

    Boxes come from the annotations' ``bbox`` and masks from their polygons (decoded by pycocotools at the
    image's size, as COCOeval decodes the ground truth), in the contiguous class ids Detectron2 trains with.
    """

    def __init__(self, dataset_name: str) -> None:
        self._records = {record["image_id"]: record for record in DatasetCatalog.get(dataset_name)}

    def _instances(self, record: dict) -> Instances:
        height, width = record["height"], record["width"]
        annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], height, width)))
                 for a in annotations]
        instances = Instances((height, width))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.scores = torch.ones(len(annotations))
        instances.pred_classes = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        instances.pred_masks = torch.from_numpy(np.stack(masks).astype(bool)) if masks else \
            torch.zeros((0, height, width), dtype=torch.bool)
        return instances

    def __call__(self, batched_inputs: list[dict]) -> list[dict]:
        return [{"instances": self._instances(self._records[item["image_id"]])} for item in batched_inputs]
