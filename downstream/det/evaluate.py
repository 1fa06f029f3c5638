"""``python -m downstream.det.evaluate``: one-off COCO evaluation of a fine-tuned Mask R-CNN checkpoint.

    python -m downstream.det.evaluate --weights runs/det-r50/model_final.pth --coco-root /data/coco

Needs only a standard COCO layout (``annotations/instances_<split>.json`` and ``<split>/``); the split is
registered here, no Detectron2 ``datasets/`` folder is needed. The config defaults to the ``config.yaml`` the
trainer stored beside the weights. Prints the AP table (pycocotools, percent) and writes
``OUT/evaluation.json`` (default OUT: ``eval-<split>/`` beside the weights) with Detectron2's
``coco_instances_results.json`` (the predictions).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.runtime.cli import ArgumentParser, run_cli, setup_logging
from pretrain.runtime.errors import UsageError
from pretrain.runtime.io import atomic_write_json, join
from pretrain.weights import TRUST_FLAG

__all__ = ["EVALUATION", "build_parser", "evaluate", "main"]

PROG = "python -m downstream.det.evaluate"
EVALUATION = "evaluation.json"
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Evaluate a fine-tuned Mask R-CNN checkpoint on a COCO split "
                                                   "(box and mask AP with pycocotools).")
    parser.add_argument("--weights", required=True, metavar="W",
                        help="trained model weights (model_final.pth or checkpoint-last.pth of a run, or any "
                             "Detectron2 model file)")
    parser.add_argument("--coco-root", required=True, metavar="DIR",
                        help="COCO folder with annotations/instances_<split>.json and <split>/")
    parser.add_argument("--config", metavar="C", help="config name or YAML file (default: config.yaml beside W)")
    parser.add_argument("--split", default="val2017", help="split to evaluate (default: %(default)s)")
    parser.add_argument(TRUST_FLAG, action="store_true", help="unpickle --weights fully even if it holds Python "
                        "objects beyond tensors and plain values (that can run code: only for files you trust)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: eval-<split>/ beside W)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="device (default auto: a GPU if visible)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parser


def _config_file(args: argparse.Namespace) -> str:
    if args.config:
        return args.config
    beside = Path(args.weights).parent / "config.yaml"
    if not beside.is_file():
        raise UsageError(f"no config.yaml beside {args.weights}: pass --config (a shipped name or a YAML file)")
    return str(beside)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by parsed ``args``; returns the content of ``evaluation.json``."""
    import torch

    from .config import adapt_to_run, load_config
    from .data import check_coco_split, coco_split_paths, register_coco_split
    from .engine import DetTrainer
    from .evaluation import det_metrics, evaluate_coco, format_table
    from .weights import load_detection_weights

    if not os.path.isfile(args.weights):
        raise UsageError(f"--weights file not found: {args.weights}")
    config = _config_file(args)
    json_file, image_root = coco_split_paths(args.coco_root, args.split)
    counts = check_coco_split(json_file, image_root)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    cfg = load_config(config, args.opts)
    adapt_to_run(cfg, 1, device)
    if counts["categories"] != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise UsageError(f"the config's model predicts {cfg.MODEL.ROI_HEADS.NUM_CLASSES} classes but {json_file} has "
                         f"{counts['categories']} categories")
    name = f"eval_{args.split}"
    register_coco_split(name, json_file, image_root)
    out = args.out or str(Path(args.weights).parent / f"eval-{args.split}")
    cfg.DATASETS.TEST = (name,)
    cfg.OUTPUT_DIR = out
    cfg.freeze()
    model = DetTrainer.build_model(cfg)
    report = load_detection_weights(model, args.weights, evaluation=True, trust=args.trust_weights)
    logger.info("%s", report.describe())
    metrics = det_metrics(evaluate_coco(cfg, model, name, out))
    document = {"weights": str(args.weights), "config": config, "coco_root": str(args.coco_root), "split": args.split,
                "images": counts["images"], "loaded": report.describe(), "metrics": metrics}
    atomic_write_json(join(out, EVALUATION), document)
    print(format_table(metrics))
    print(f"wrote {join(out, EVALUATION)}")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 on success, 1 (one line on stderr) on a runtime error, 2 on a usage error."""
    args = build_parser().parse_intermixed_args(argv)
    setup_logging()
    return run_cli(PROG, lambda: evaluate(args) and 0)


if __name__ == "__main__":
    sys.exit(main())
