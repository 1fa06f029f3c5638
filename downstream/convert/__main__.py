"""``python -m downstream.convert {timm,detectron2} SRC DST``: pretrained weights for the downstream stages."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pretrain.runtime.cli import ArgumentParser, run_cli
from pretrain.runtime.errors import UsageError

PROG = "python -m downstream.convert"
SOURCES = ("a pretraining checkpoint-last.pth, encoder_timm.pth (or this tool's timm output), a timm training "
           "checkpoint, or a plain timm state dict (with --model)")


def _timm(args: argparse.Namespace) -> None:
    from .to_timm import convert_to_timm

    payload = convert_to_timm(args.src, args.dst, args.model)
    print(f"wrote {args.dst}: {len(payload['state_dict'])} tensors of timm {payload['model_name']} "
          f"(load with timm.create_model({payload['model_name']!r}, num_classes=K): only the classifier is missing)")


def _detectron2(args: argparse.Namespace) -> None:
    from .to_detectron2 import convert_to_detectron2, resnet_depth

    payload, dropped = convert_to_detectron2(args.src, args.dst, args.model)
    print(f"wrote {args.dst}: {len(payload['model'])} tensors of a ResNet-{resnet_depth(payload['model'])} "
          "in Detectron2's names (use it with RESNETS.STRIDE_IN_1X1 False)"
          + (f"; left out the classifier ({', '.join(dropped)})" if dropped else ""))


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m downstream.convert`` parser, one sub-command per target format."""
    parser = ArgumentParser(prog=PROG, description="Convert pretrained weights for fine-tuning (timm) or "
                                                   "Detectron2 detection.")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    helps = {
        "timm": (_timm, "a checked timm state dict {state_dict, model_name, meta} (the encoder_timm.pth format)",
                 "output file (.pth)"),
        "detectron2": (_detectron2, "Detectron2's pickle of a timm ResNet in Detectron2's names (318 tensors for "
                                    "ResNet-50; other convnets use the timm backbone and need no conversion)",
                       "output file (.pkl)"),
    }
    for name, (run, text, dst_help) in helps.items():
        sub = targets.add_parser(name, help=text, description=f"Write {text}. SRC: {SOURCES}.")
        sub.add_argument("src", metavar="SRC", help="weights to convert")
        sub.add_argument("dst", metavar="DST", help=dst_help)
        sub.add_argument("--model", help="expected timm architecture (required for a plain state dict; an error if "
                                         "SRC records another)")
        sub.add_argument("--force", action="store_true", help="replace DST if it exists")
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one conversion: 0 on success, 1 (one line on stderr) on a runtime error, 2 on a usage error."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        if os.path.exists(args.dst) and not args.force:
            raise UsageError(f"{args.dst} exists; add --force to replace it")
        args.run(args)

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
