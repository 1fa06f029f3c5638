"""Command line for the data tools: ``python -m pretrain.data {make-demo,check} ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..runtime.cli import ArgumentParser, run_cli, setup_logging
from .demo import CLASSES, DemoSpec, default_demo_root, make_demo_dataset
from .folder import ImageFolderDataset

PROG = "python -m pretrain.data"


def _int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"in {minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _make_demo(args: argparse.Namespace) -> None:
    counts = {"num_classes": args.classes, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class}
    try:
        root = make_demo_dataset(args.dir, **counts, image_size=args.image_size, seed=args.seed, overwrite=args.force)
    except FileExistsError as error:
        raise FileExistsError(f"{error}; add --force to replace it") from error
    print(f"wrote {root}/train and {root}/val ({args.classes} classes, seed {args.seed})")


def _check(args: argparse.Namespace) -> None:
    dataset = ImageFolderDataset(args.dir)
    first = dataset.check_readable()
    layout = f"{len(dataset.classes)} classes (ImageNet layout)" if dataset.classes else "flat folder, unlabelled"
    print(f"{dataset.root}: {len(dataset)} image files, {layout}; first readable: {dataset.samples[first][0]}")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pretrain.data`` parser with one sub-parser per tool."""
    parser = ArgumentParser(prog=PROG, description="Data tools for SparK pretraining.")
    tools = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    defaults = DemoSpec()

    demo = tools.add_parser(
        "make-demo",
        help="draw the embedded demo image set (ImageNet layout) into DIR",
        description=(
            "Draw a deterministic labelled image set, DIR/train/<class>/*.png and DIR/val/<class>/*.png, "
            "whose classes are (shape, texture) pairs with random colours, placement and background. "
            f"DIR defaults to the demo cache: {default_demo_root()} (environment variable SPARK_DEMO_DATA)."
        ),
    )
    demo.add_argument("dir", metavar="DIR", nargs="?", type=Path, default=default_demo_root(), help="output folder")
    counts = {
        "--seed": (_int_in(0), defaults.seed, "random seed"),
        "--classes": (_int_in(1, len(CLASSES)), defaults.num_classes, f"number of classes, at most {len(CLASSES)}"),
        "--train-per-class": (_int_in(1), defaults.train_per_class, "training images per class"),
        "--val-per-class": (_int_in(1), defaults.val_per_class, "validation images per class"),
        "--image-size": (_int_in(32), defaults.image_size, "image side in pixels"),
    }
    for flag, (kind, default, text) in counts.items():
        demo.add_argument(flag, type=kind, default=default, metavar="N", help=f"{text} (default {default})")
    demo.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    demo.set_defaults(run=_make_demo)

    check = tools.add_parser(
        "check",
        help="validate an image folder the way a run does before training",
        description=(
            "List the images of DIR (ImageNet layout or flat folder) and decode files in order until one "
            "succeeds; exit 1 naming DIR if it is missing, empty or has no readable image."
        ),
    )
    check.add_argument("dir", metavar="DIR", type=Path, help="image folder")
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one tool; 0 on success, 1 (one line on stderr) on a runtime error, 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(level=logging.WARNING)
    return run_cli(PROG, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
