"""Benchmark of full SparK training steps: the sparse encoder against zero-outing, side by side.

``python -m pretrain.bench --model resnet50 --input-size 224 --batch-size 8`` times forward, backward
and optimiser step of ``SparK(masking='sparse')`` and of the same model with ``masking='zero'`` (the
dense timm encoder on the zeroed image, same decoder) after warm-up, each in a fresh child process
so that peak memory is measured per mode, alternating the modes ``--repeats`` times, and prints the
best median seconds per step, images/s, peak memory (RSS on CPU, max allocated on CUDA) and the
sparse/zero ratios. ``--modes sparse,gather,zero`` adds the ``gather`` backend (convolutions and
linear layers computed at visible sites only) beside the default ``masked`` one. On CUDA it also
reports the device-busy time of one step (the sum of its kernel times, from the profiler) and its
number of kernels: a step much longer than its busy time is bound by the host launching kernels.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2

from .runtime.cli import ArgumentParser
from .runtime.config import AMP_CHOICES, CHANNELS_LAST_CHOICES
from .runtime.precision import Precision, choose_precision
from .spark import build_spark_from_config

# Benchmark modes: the model each one builds (overrides of build_spark_from_config).
MODES: dict[str, dict[str, str]] = {
    "sparse": {"masking": "sparse", "sparse_backend": "masked"},
    "gather": {"masking": "sparse", "sparse_backend": "gather"},
    "zero": {"masking": "zero"},
}


@dataclass(frozen=True)
class BenchResult:
    """Timing and memory of one benchmark mode."""

    mode: str
    median_s: float
    images_per_s: float
    peak_mem_mb: float
    loss: float
    device_busy_s: float | None = None  # CUDA: summed kernel time of one step
    kernels: int | None = None  # CUDA: kernels launched by one step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _device_busy(step: Callable[[], object]) -> tuple[float, int]:
    """Summed CUDA kernel time (s) and kernel count of one call of ``step``, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time_total for e in kernels) / 1e6, len(kernels)


def run_mode(args: argparse.Namespace, mode: str) -> BenchResult:
    """Time ``args.steps`` training steps of one benchmark mode in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = {"model": args.model, "decoder_width": args.decoder_width, "input_size": args.input_size}
    model = build_spark_from_config(config, **MODES[mode])
    model.to(device).train()
    precision = choose_precision(device, args.amp, args.channels_last)
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = create_optimizer_v2(model, "lamb", lr=1e-4, weight_decay=0.04)
    forward = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = precision.autocast(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(active: torch.Tensor) -> float:
        with autocast:
            loss_t = forward(images, active)
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        return loss_t.item()

    times, loss = [], float("nan")
    for index in range(args.warmup + args.steps):
        active = model.mask(args.batch_size, device, generator=generator)
        _sync(device)
        start = time.perf_counter()
        loss = step(active)
        _sync(device)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = _peak_memory_mb(device)
    busy, kernels = None, None
    if device.type == "cuda":
        active = model.mask(args.batch_size, device, generator=generator)
        busy, kernels = _device_busy(lambda: step(active))
    return BenchResult(mode, median, args.batch_size / median, peak, loss, busy, kernels)


def _child_command(args: argparse.Namespace, mode: str) -> list[str]:
    argv = [sys.executable, "-m", "pretrain.bench", "--child", mode, "--model", args.model,
            "--input-size", str(args.input_size), "--batch-size", str(args.batch_size), "--device", args.device,
            "--amp", args.amp, "--channels-last", args.channels_last, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--decoder-width", str(args.decoder_width)]
    argv += ["--compile"] * args.compile
    return argv


FP32_SUFFIX = "@fp32"  # a run of a mode in plain fp32 (no autocast, contiguous, eager): the precision baseline


def run_in_child(args: argparse.Namespace, run: str) -> BenchResult:
    """Run one mode (``run`` is a mode name, or ``<mode>@fp32`` for its plain fp32 baseline) in a fresh
    interpreter (a clean peak-memory reading) and parse its JSON line."""
    mode = run.removesuffix(FP32_SUFFIX)
    if run.endswith(FP32_SUFFIX):
        args = argparse.Namespace(**{**vars(args), "amp": "none", "channels_last": "off", "compile": False})
    proc = subprocess.run(_child_command(args, mode), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {run} failed:\n{proc.stderr.strip()}")
    return replace(BenchResult(**json.loads(proc.stdout.strip().splitlines()[-1])), mode=run)


def best_of_repeats(args: argparse.Namespace, runs: list[str]) -> dict[str, BenchResult]:
    """Run the runs alternately ``args.repeats`` times (ABAB, so slow drifts of a shared machine hit
    all of them) and keep, per run, the one with the lowest median step time."""
    best: dict[str, BenchResult] = {}
    for _ in range(args.repeats):
        for run in runs:
            result = run_in_child(args, run)
            if run not in best or result.median_s < best[run].median_s:
                best[run] = result
    return best


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m pretrain.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="timm model name (default resnet50)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decoder-width", type=int, default=768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="autocast dtype; auto: bf16 where the device computes it natively (default auto)")
    parser.add_argument("--channels-last", choices=CHANNELS_LAST_CHOICES, default="auto", nargs="?", const="on",
                        help="channels-last memory format; auto: where it pays off on the device; "
                             "--channels-last alone means on (default auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model (compile time excluded)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per mode, best kept (default 2)")
    parser.add_argument("--modes", default="sparse,zero",
                        help=f"comma-separated modes to time, from {','.join(MODES)} (default sparse,zero)")
    parser.add_argument("--against-fp32", action="store_true",
                        help="also time every mode in plain fp32 in the same alternation and report the ratio "
                             "(for --amp bf16 / --channels-last / --compile against the fp32 step)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON summary to FILE")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1 and --warmup at least 0")
    if args.input_size % 32:
        parser.error(f"--input-size {args.input_size} is not divisible by 32")
    if args.child:
        print(json.dumps(asdict(run_mode(args, args.child))))
        return 0
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    runs = modes + [m + FP32_SUFFIX for m in modes] * args.against_fp32
    results = best_of_repeats(args, runs)
    precision = choose_precision(args.device, args.amp, args.channels_last)
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "save")},
               "device_name": _device_name(args.device, precision), "precision": precision.to_dict(),
               "results": {m: asdict(r) for m, r in results.items()}}
    summary.update(ratios(results))
    if args.save:
        Path(args.save).write_text(json.dumps(summary, indent=1) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary)
    return 0


def ratios(results: dict[str, BenchResult]) -> dict[str, float]:
    """Time and memory ratios ``<mode>_over_<baseline>_{time,memory}`` of every sparse mode against
    zero-outing, of the gather backend against the masked one, and of every mode against its plain
    fp32 run (``--against-fp32``)."""
    pairs = [(mode, "zero") for mode in ("sparse", "gather")] + [("gather", "sparse")]
    pairs += [(mode, mode + FP32_SUFFIX) for mode in MODES]
    out: dict[str, float] = {}
    for mode, base in pairs:
        if {mode, base} <= results.keys():
            name = f"{mode}_over_{'fp32' if base.endswith(FP32_SUFFIX) else base}"
            out[f"{name}_time"] = results[mode].median_s / results[base].median_s
            out[f"{name}_memory"] = results[mode].peak_mem_mb / results[base].peak_mem_mb
    return out


def _device_name(device: str, precision: Precision) -> str:
    """The device, and for a CPU its thread count and whether it computes bf16 natively."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    native = "native bf16" if precision.bf16_native else "no native bf16"
    return f"{precision.device_name} CPU ({torch.get_num_threads()} threads, {native})"


def _print_table(summary: dict) -> None:
    s = summary["settings"]
    p = summary["precision"]
    print(f"{s['model']} {s['input_size']}px batch {s['batch_size']} on {summary['device_name']}, "
          f"amp={p['amp']} channels_last={p['channels_last']} compile={s['compile']} ({p['reason']})")
    on_cuda = any(r["device_busy_s"] is not None for r in summary["results"].values())
    busy_header = f" {'busy s':>8} {'kernels':>8}" if on_cuda else ""
    print(f"{'mode':<12} {'s/step':>8} {'img/s':>8} {'peak MB':>9} {'loss':>8}{busy_header}")
    for r in summary["results"].values():
        busy = f" {r['device_busy_s']:>8.3f} {r['kernels']:>8d}" if r["device_busy_s"] is not None else ""
        print(f"{r['mode']:<12} {r['median_s']:>8.3f} {r['images_per_s']:>8.2f} {r['peak_mem_mb']:>9.0f} "
              f"{r['loss']:>8.4f}{busy}")
    for key in summary:
        if key.endswith("_time"):
            pair = key.removesuffix("_time").replace("_over_", "/")
            print(f"{pair}: time {summary[key]:.3f}x, memory {summary[key.removesuffix('_time') + '_memory']:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
