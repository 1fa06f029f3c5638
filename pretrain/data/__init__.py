"""Data for SparK pretraining: validated image folders, the paper's transforms, an embedded demo set.

``python -m pretrain.data --help`` lists the command-line tools.
"""

from .demo import DemoSpec, default_demo_root, demo_data_for_run, ensure_demo_data, make_demo_dataset
from .folder import (
    Batch,
    DataError,
    ImageFolderDataset,
    build_eval_dataset,
    build_pretrain_dataset,
    collate_skip_corrupt,
    load_rgb,
)
from .transforms import PRETRAIN_SCALE, denormalize, eval_transform, pretrain_transform

__all__ = [
    "PRETRAIN_SCALE",
    "Batch",
    "DataError",
    "DemoSpec",
    "ImageFolderDataset",
    "build_eval_dataset",
    "build_pretrain_dataset",
    "collate_skip_corrupt",
    "default_demo_root",
    "demo_data_for_run",
    "denormalize",
    "ensure_demo_data",
    "eval_transform",
    "load_rgb",
    "make_demo_dataset",
    "pretrain_transform",
]
