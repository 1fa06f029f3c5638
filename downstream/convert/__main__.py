"""``python -m downstream.convert {timm,detectron2,hf} SRC DST``: pretrained weights for timm, Detectron2 and the
Hugging Face Hub."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pretrain.runtime.cli import ArgumentParser, run_cli
from pretrain.runtime.errors import UsageError
from pretrain.weights import TRUST_FLAG

PROG = "python -m downstream.convert"
SOURCES = ("any weights file the suite reads: a pretraining or fine-tuning checkpoint-last.pth, encoder_timm.pth (or "
           "this tool's timm output), a timm training checkpoint or state dict, a Hugging Face folder, the released "
           "SparK files (*_timm_style.pth, convnext*_official_style.pth, *_withdecoder_*_spark_style.pth), a "
           "Detectron2 ResNet backbone")


def _timm(args: argparse.Namespace) -> None:
    from .to_timm import convert_to_timm

    payload = convert_to_timm(args.src, args.dst, args.model, trust=args.trust_weights)
    name, untrained = payload["model_name"], payload["meta"]["untrained"]
    print(f"wrote {args.dst}: {len(payload['state_dict'])} tensors of timm {name} from a {payload['meta']['layout']} "
          f"file, {', '.join(untrained)} at timm's initialisation (load with timm.create_model({name!r}, "
          f"pretrained=True, pretrained_cfg_overlay={{'file': PATH}}), or timm's train.py --pretrained "
          "--pretrained-path PATH)")


def _detectron2(args: argparse.Namespace) -> None:
    from .to_detectron2 import convert_to_detectron2, resnet_depth

    payload, dropped = convert_to_detectron2(args.src, args.dst, args.model, trust=args.trust_weights)
    print(f"wrote {args.dst}: {len(payload['model'])} tensors of a ResNet-{resnet_depth(payload['model'])} "
          "in Detectron2's names (use it with RESNETS.STRIDE_IN_1X1 False)"
          + (f"; left out the classifier ({', '.join(dropped)})" if dropped else ""))


def _hf(args: argparse.Namespace) -> None:
    from pretrain.weights import read_weights, write_hub_folder

    weights = read_weights(args.src, args.model, trust=args.trust_weights)
    folder = write_hub_folder(weights, args.dst, force=args.force)
    print(f"wrote {folder}: model.safetensors and config.json of headless timm {weights.model_name} from a "
          f"{weights.layout} file (load with timm.create_model('local-dir:{folder}', pretrained=True, num_classes=K))")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m downstream.convert`` parser, one sub-command per target format."""
    parser = ArgumentParser(prog=PROG, description="Convert pretrained weights for fine-tuning (timm, the Hugging "
                                                   "Face Hub) or Detectron2 detection.")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    helps = {
        "timm": (_timm, "a checked timm file {state_dict, model_name, meta} (the encoder_timm.pth format: every key "
                        "of timm's 1000-class model, the classifier freshly initialised)", "output file (.pth)"),
        "detectron2": (_detectron2, "Detectron2's pickle of a timm ResNet in Detectron2's names (318 tensors for "
                                    "ResNet-50; other convnets use the timm backbone and need no conversion)",
                       "output file (.pkl)"),
        "hf": (_hf, "a Hugging Face Hub model folder for timm (model.safetensors + config.json, headless: "
                    "num_classes 0)", "output folder"),
    }
    for name, (run, text, dst_help) in helps.items():
        sub = targets.add_parser(name, help=text, description=f"Write {text}. SRC: {SOURCES}.")
        sub.add_argument("src", metavar="SRC", help="weights to convert")
        sub.add_argument("dst", metavar="DST", help=dst_help)
        sub.add_argument("--model", help="expected timm architecture (needed only when SRC names none and its keys "
                                         "match none of the suite's models; an error if SRC records another)")
        sub.add_argument("--force", action="store_true", help="replace DST if it exists")
        sub.add_argument(TRUST_FLAG, action="store_true",
                         help="unpickle SRC fully even if it holds Python objects beyond tensors and plain values "
                              "(that can run code from the file: only for files you trust)")
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
