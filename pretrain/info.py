"""Parameter count and FLOPs of a timm classifier, counted as in table 4 of the paper.

``python -m pretrain.info --model resnet50`` prints ``resnet50: 25.6 M params, 4.1 G FLOPs at 224 px``.
FLOPs are fvcore's count (one per multiply-accumulate), the convention of table 4.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, dataclass

import timm
import torch

from .runtime.cli import ArgumentParser


@dataclass(frozen=True)
class ModelInfo:
    """Size of one architecture at one input resolution."""

    model: str
    input_size: int
    params_m: float
    flops_g: float


def model_info(name: str, input_size: int = 224) -> ModelInfo:
    """Parameters (millions) and fvcore FLOPs (billions) of ``timm.create_model(name)`` at ``input_size``."""
    with warnings.catch_warnings():  # fvcore's import uses the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    flops = FlopCountAnalysis(model, torch.zeros(1, 3, input_size, input_size))
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return ModelInfo(name, input_size, params / 1e6, flops.total() / 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pretrain.info", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, nargs="+", help="timm model name(s), e.g. resnet50 convnext_small")
    parser.add_argument("--input-size", type=int, default=224, help="square input resolution (default 224)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    args = parser.parse_args(argv)
    for name in args.model:
        if not timm.is_model(name):
            parser.error(f"unknown timm model {name!r}")
    for name in args.model:
        info = model_info(name, args.input_size)
        if args.json:
            print(json.dumps(asdict(info)))
        else:
            print(f"{info.model}: {info.params_m:.1f} M params, {info.flops_g:.1f} G FLOPs at {info.input_size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
