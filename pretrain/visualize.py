"""Figure 4 of the paper from a pretraining checkpoint: raw | masked | prediction + visible | prediction.

``python -m pretrain.visualize --weights runs/x/checkpoint-last.pth --images DIR --out recon.png``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import load_spark_checkpoint
from .data import ImageFolderDataset, build_eval_dataset, denormalize
from .encoder import SparseEncoder
from .runtime.cli import ArgumentParser, run_cli, setup_logging
from .spark import SparK

__all__ = ["draw_reconstructions", "main", "reconstruction_figure"]

PROG = "python -m pretrain.visualize"
COLUMNS = ("raw", "masked", "prediction + visible", "prediction")
PANEL_INCHES = 2.0
PATCH = SparseEncoder.downsample_ratio  # input sides must be multiples of the mask patch


def reconstruction_figure(panels: Sequence[torch.Tensor], titles: Sequence[str] = COLUMNS) -> Figure:
    """One row per image, one column per ``(B, 3, H, W)`` panel in ``[0, 1]``, ``titles`` above the columns."""
    rows, cols = panels[0].shape[0], len(panels)
    figure = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES + 0.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for col, (panel, title) in enumerate(zip(panels, titles)):
        axes[0, col].set_title(title, fontsize=10)
        for row in range(rows):
            axes[row, col].imshow(panel[row].permute(1, 2, 0).float().cpu().numpy())
            axes[row, col].set_axis_off()
    return figure


def _save_atomically(figure: Figure, out_path: Path) -> None:
    """Render to a temporary sibling of ``out_path``, then rename it into place."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = out_path.suffix.lstrip(".").lower() or "png"
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(tmp, format=fmt, dpi=100)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def draw_reconstructions(model: SparK, images: torch.Tensor, active: torch.Tensor, out_path: str | os.PathLike) -> Path:
    """Save the figure-4 grid for normalised ``images`` ``(B, 3, H, W)`` under mask ``active`` ``(B, 1, h, w)``.

    Columns: raw | masked | prediction with visible patches pasted | pure prediction, un-normalised with the
    ImageNet mean/std and clamped to ``[0, 1]``. Returns the written path.
    """
    recon = model.reconstruct(images, active)
    panels = [denormalize(panel) for panel in (images, recon.masked, recon.pasted, recon.prediction)]
    out_path = Path(out_path)
    _save_atomically(reconstruction_figure(panels), out_path)
    return out_path


def _pick_images(dataset: ImageFolderDataset, num: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``num`` readable images of ``dataset`` in a seeded random order, stacked ``(B, 3, S, S)``."""
    picked = []
    for index in torch.randperm(len(dataset), generator=generator).tolist():
        sample = dataset[index]
        if sample is not None:
            picked.append(sample[0])
        if len(picked) == num:
            break
    return torch.stack(picked)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pretrain.visualize`` parser."""
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Draw figure 4 of the SparK paper: for a few images, the raw image, the masked input, the prediction "
            "with visible patches pasted back, and the pure prediction."
        ),
    )
    parser.add_argument("--weights", type=Path, required=True, metavar="FILE",
                        help="checkpoint written by pretraining (checkpoint-last.pth)")
    parser.add_argument("--images", type=Path, required=True, help="image folder (ImageNet layout or flat)")
    parser.add_argument("--out", type=Path, required=True, help="output figure; format from its suffix (.png, .pdf)")
    parser.add_argument("--num", type=_positive_int, default=4, help="number of images (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the image choice and mask (default %(default)s)")
    parser.add_argument("--mask-ratio", type=_ratio, help="fraction of masked patches (default: the checkpoint's)")
    parser.add_argument(
        "--input-size", type=_positive_int, help=f"image side, a multiple of {PATCH} (default: the checkpoint's)"
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="torch device (default %(default)s)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    formats = FigureCanvasAgg.get_supported_filetypes()
    if args.out.suffix.lstrip(".").lower() not in formats:
        parser.error(f"--out must end in one of {', '.join('.' + ext for ext in sorted(formats))}, got {args.out}")
    if args.input_size is not None and args.input_size % PATCH:
        parser.error(f"--input-size must be a multiple of {PATCH}, got {args.input_size}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; 0 on success, 1 (one line on stderr) on a bad checkpoint or image folder, 2 on usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    setup_logging(level=logging.WARNING)
    return run_cli(PROG, lambda: _draw(args))


def _draw(args: argparse.Namespace) -> None:
    model, config = load_spark_checkpoint(args.weights, mask_ratio=args.mask_ratio)
    size = args.input_size or config["input_size"]
    images = _pick_images(build_eval_dataset(args.images, size), args.num, torch.Generator().manual_seed(args.seed))
    model, images = model.to(args.device), images.to(args.device)
    grid = (size // model.patch_size,) * 2
    active = model.mask(len(images), args.device, generator=torch.Generator().manual_seed(args.seed), grid=grid)
    out = draw_reconstructions(model, images, active, args.out)
    print(f"wrote {out} ({len(images)} images, mask ratio {model.mask_ratio}, {config['model']})")


if __name__ == "__main__":
    sys.exit(main())
