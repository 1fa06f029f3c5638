"""``python -m downstream.det.train``: fine-tune Mask R-CNN on COCO from SparK weights (tables 9 and 10).

    python -m downstream.det.train --config mask_rcnn_R_50_FPN_1x --weights r50.pkl --out runs/det-r50 \\
        --coco-root /data/coco [--resume] [--num-gpus 8 --num-machines 2 --machine-rank 0 --dist-url tcp://h:port] \\
        [KEY VALUE ...]

Ranks: ``--num-gpus N`` (per machine) > 1 or ``--num-machines`` > 1 spawn GPU workers through Detectron2's
``launch``; inside a SLURM step with several tasks, or under torchrun, every process is already a rank: the
process group comes from the environment (:mod:`pretrain.runtime.distributed`) and no process is spawned.
The run folder receives ``config.yaml`` (Detectron2's resolved config, what ``downstream.det.evaluate`` reads),
``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-last.pth``, ``model_final.pth``,
``inference/`` and, when done, ``result.json`` with box and mask AP (pycocotools, percent).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from pretrain.runtime.cli import ArgumentParser, run_cli, setup_logging
from pretrain.runtime.config import AMP_CHOICES, CHANNELS_LAST_CHOICES, DEFAULT_STOP_SIGNALS
from pretrain.runtime.errors import SuiteError, UsageError
from pretrain.runtime.io import atomic_write_json, atomic_write_text, join
from pretrain.runtime.result import RESULT, write_result
from pretrain.runtime.signals import StopRequest, parse_signals
from pretrain.runtime.stage import Outcome
from pretrain.weights import TRUST_FLAG

__all__ = ["build_parser", "main", "run"]

PROG = "python -m downstream.det.train"
logger = logging.getLogger(__name__)


class RunError(SuiteError):
    """A detection run that cannot start or continue (one line)."""


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (importing this module imports neither torch nor detectron2)."""
    parser = ArgumentParser(prog=PROG, description="Fine-tune Mask R-CNN on COCO from SparK weights (tables 9, 10) "
                                                   "with Detectron2; evaluate box and mask AP with pycocotools.",
                            epilog="KEY VALUE pairs override the config, e.g. SOLVER.MAX_ITER 1000 "
                                   "SOLVER.IMS_PER_BATCH 8")
    parser.add_argument("--config", required=True, metavar="C",
                        help="a shipped config name (mask_rcnn_R_50_FPN_1x, mask_rcnn_R_50_FPN_2x, "
                             "mask_rcnn_R_50_FPN_1x_published, mask_rcnn_convnext_base_FPN_3x, tiny) or a YAML file")
    parser.add_argument("--weights", required=True, metavar="W",
                        help="pretrained weights: a Detectron2 .pkl (downstream.convert detectron2) or model .pth, "
                             "or any file python -m downstream.convert reads (encoder_timm.pth, a SparK "
                             "checkpoint-last.pth, the released SparK files...: timm backbone or ResNet); 'none' "
                             "trains from scratch")
    parser.add_argument(TRUST_FLAG, action="store_true", help="unpickle --weights fully even if it holds Python "
                        "objects beyond tensors and plain values (that can run code: only for files you trust)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint-last.pth if present")
    parser.add_argument("--coco-root", metavar="DIR",
                        help="COCO folder (annotations/instances_<split>.json, <split>/) for the config's "
                             "coco_<year>_<train|val> datasets; default: Detectron2's DETECTRON2_DATASETS/coco")
    parser.add_argument("--amp", choices=AMP_CHOICES, help="autocast dtype (SOLVER.PRECISION.AMP; default auto: "
                                                           "bf16 where the device computes it natively)")
    parser.add_argument("--channels-last", choices=CHANNELS_LAST_CHOICES,
                        help="channels-last memory format (SOLVER.PRECISION.CHANNELS_LAST; default auto)")
    parser.add_argument("--stop-signals", nargs="+", default=list(DEFAULT_STOP_SIGNALS), metavar="SIG",
                        help="signals that save a checkpoint and stop cleanly (default: %(default)s)")
    parser.add_argument("--num-gpus", type=int, default=1, metavar="N", help="GPU workers per machine to spawn")
    parser.add_argument("--num-machines", type=int, default=1, metavar="M", help="machines of a launch")
    parser.add_argument("--machine-rank", type=int, default=0, metavar="R", help="this machine's rank in a launch")
    parser.add_argument("--dist-url", default="auto", metavar="U",
                        help="rendezvous of a launch (tcp://host:port; auto: a free local port, one machine)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parser


def _dist_env():  # -> DistEnv
    """This process's rank: from a running process group (spawned by ``launch``) or the environment."""
    import torch.distributed as dist

    from pretrain.runtime.distributed import DistEnv, init_distributed

    from .compat import setup_local_process_group

    if dist.is_available() and dist.is_initialized():  # a worker of Detectron2's launch
        import torch
        from detectron2.utils import comm

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistEnv(dist.get_rank(), dist.get_world_size(), comm.get_local_rank(), device)
    env = init_distributed("auto")
    if env.distributed:
        setup_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or None)
    return env


def _resolve(args: argparse.Namespace, env: Any):  # -> (CfgNode, Precision, notes)
    """Detectron2 config of the run: file + overrides + flags, adapted to this process, precision resolved."""
    from pretrain.runtime.precision import choose_precision

    from .config import adapt_to_run, load_config

    cfg = load_config(args.config, args.opts)
    if args.amp:
        cfg.SOLVER.PRECISION.AMP = args.amp
    if args.channels_last:
        cfg.SOLVER.PRECISION.CHANNELS_LAST = args.channels_last
    cfg.OUTPUT_DIR = str(args.out)
    cfg.MODEL.WEIGHTS = "" if args.weights == "none" else str(args.weights)
    notes = adapt_to_run(cfg, env.world_size, env.device.type)
    try:
        precision = choose_precision(env.device, cfg.SOLVER.PRECISION.AMP, cfg.SOLVER.PRECISION.CHANNELS_LAST)
    except ValueError as error:
        raise UsageError(f"SOLVER.PRECISION: {error}") from error
    cfg.SOLVER.PRECISION.AMP = precision.amp
    cfg.SOLVER.PRECISION.CHANNELS_LAST = "on" if precision.channels_last else "off"
    if cfg.SOLVER.IMS_PER_BATCH % env.world_size:
        raise UsageError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by {env.world_size} ranks")
    cfg.freeze()
    return cfg, precision, notes


def _prepare_data(cfg: Any, coco_root: str | None) -> dict[str, dict]:
    """Register (``--coco-root``) or locate the config's datasets and check them; returns their counts."""
    from detectron2.data import MetadataCatalog

    from .data import DataError, check_coco_split, coco_split_paths, register_coco_split, split_of_dataset

    counts = {}
    for name in dict.fromkeys((*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)):
        if coco_root:
            json_file, image_root = coco_split_paths(coco_root, split_of_dataset(name))
            counts[name] = check_coco_split(json_file, image_root)
            register_coco_split(name, json_file, image_root)
            continue
        metadata = MetadataCatalog.get(name)
        if not hasattr(metadata, "json_file"):
            raise DataError(f"dataset {name!r} is not registered in Detectron2: pass --coco-root DIR")
        try:
            counts[name] = check_coco_split(metadata.json_file, metadata.image_root)
        except DataError as error:
            raise DataError(f"{error} (dataset {name}; pass --coco-root DIR or set DETECTRON2_DATASETS)") from error
    classes = {name: c["categories"] for name, c in counts.items()}
    wrong = {name: n for name, n in classes.items() if n != cfg.MODEL.ROI_HEADS.NUM_CLASSES}
    if wrong:
        raise UsageError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but the data has "
                         + ", ".join(f"{n} categories in {name}" for name, n in wrong.items()))
    return counts


def _check_out(args: argparse.Namespace) -> None:
    from pretrain.runtime.checkpoint import find_checkpoint

    existing = find_checkpoint(args.out) if os.path.isdir(args.out) else None
    if existing and not args.resume:
        raise UsageError(f"{args.out} already holds {existing}; pass --resume to continue it or choose another --out")


def _resolved(args: argparse.Namespace, cfg: Any, precision: Any, world_size: int, notes: list[str]) -> dict:
    """The run's resolved configuration as plain data (``config.json``, ``--print-config``, ``result.json``)."""
    import yaml

    return {"config": str(args.config), "weights": str(args.weights), "coco_root": args.coco_root,
            "world_size": world_size, "precision": precision.to_dict(), "adapted": notes,
            "detectron2": yaml.safe_load(cfg.dump())}


def _write_config(args: argparse.Namespace, cfg: Any, precision: Any, env: Any, notes: list[str]) -> dict:
    resolved = _resolved(args, cfg, precision, env.world_size, notes)
    if env.is_main:
        atomic_write_text(join(args.out, "config.yaml"), cfg.dump())
        atomic_write_json(join(args.out, "config.json"), resolved)
    return resolved


def _train(args: argparse.Namespace, stop: StopRequest) -> Outcome:
    """One rank of a run (the whole run on one process)."""
    import torch
    from detectron2.utils.env import seed_all_rng

    from .engine import DetTrainer
    from .evaluation import det_metrics, format_table

    env = _dist_env()
    setup_logging(env.is_main)
    cfg, precision, notes = _resolve(args, env)
    counts = _prepare_data(cfg, args.coco_root)
    resolved = _write_config(args, cfg, precision, env, notes)
    logger.info("%s", precision.describe())
    for note in notes:
        logger.info("config adapted: %s", note)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + env.rank)
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    started = time.monotonic()
    trainer = DetTrainer(cfg, stop)
    logger.info("%s", trainer.resume_or_load(resume=args.resume, weights=str(args.weights), trust=args.trust_weights))
    try:
        finished = trainer.train()
    except FloatingPointError as error:
        raise RunError(f"{error}".splitlines()[0] + f"; the last checkpoint in {args.out} is kept") from error
    if not finished:
        outcome = Outcome("stopped", f"stopped by {stop.signal_name} after iteration {trainer.iter + 1} of "
                                     f"{cfg.SOLVER.MAX_ITER}: checkpoint saved, rerun with --resume", args.out,
                          stop.signal_name)
    elif env.is_main:  # the evaluation's numbers live on the main rank
        metrics = det_metrics(trainer.last_results)
        extra = {"iterations": cfg.SOLVER.MAX_ITER, "train_time_s": round(time.monotonic() - started, 1)}
        write_result(args.out, "det", cfg.MODEL.TIMM.NAME if "timm" in cfg.MODEL.BACKBONE.NAME
                     else f"resnet{cfg.MODEL.RESNETS.DEPTH}", {**metrics, **extra}, resolved,
                     inputs={"weights": str(args.weights), "data": {"coco_root": args.coco_root, "splits": counts}},
                     outputs={"weights": join(args.out, "model_final.pth"), "config": join(args.out, "config.yaml")})
        print(format_table(metrics))
        message = (f"done: {cfg.SOLVER.MAX_ITER} iterations; box AP {metrics.get('bbox_AP')}, mask AP "
                   f"{metrics.get('segm_AP')}; results in {join(args.out, RESULT)}")
        outcome = Outcome("completed", message, args.out)
    else:
        outcome = Outcome("completed", f"done: {cfg.SOLVER.MAX_ITER} iterations", args.out)
    if env.is_main:
        print(outcome.message)
    return outcome


def _launched_worker(args: argparse.Namespace) -> None:
    """Body of a GPU worker spawned by Detectron2's ``launch``."""
    stop = StopRequest()
    with stop.installed(parse_signals(args.stop_signals)):
        _train(args, stop)


def _forward_to_children(signum: int, frame: object) -> None:
    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)


def _launch(args: argparse.Namespace) -> Outcome:
    """Spawn ``--num-gpus`` workers on this machine (Detectron2's ``launch``); stop signals are forwarded."""
    import torch
    from detectron2.engine import launch

    if torch.cuda.device_count() < args.num_gpus:
        raise UsageError(f"--num-gpus {args.num_gpus}: {torch.cuda.device_count()} GPUs visible (Detectron2's launch "
                         "spawns one process per GPU; CPU ranks come from torchrun or a SLURM step instead)")
    if args.num_machines > 1 and args.dist_url == "auto":
        raise UsageError("--num-machines > 1 needs --dist-url tcp://HOST:PORT of machine 0")
    signals = parse_signals(args.stop_signals)
    previous = {sig: signal.signal(sig, _forward_to_children) for sig in signals}
    try:
        launch(_launched_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if os.path.isfile(join(args.out, RESULT)):
        return Outcome("completed", f"done; results in {join(args.out, RESULT)}", args.out)
    return Outcome("stopped", f"workers ended without a result: rerun with --resume to continue {args.out}", args.out)


def run(argv: Sequence[str] | None = None, stop: StopRequest | None = None) -> Outcome:
    """Parse ``argv`` and train (the stage entry point the sweep calls in-process).

    Raises :class:`UsageError` / :class:`SuiteError` subclasses on bad input; returns ``Outcome("completed")`` with
    ``result.json`` written, or ``Outcome("stopped")`` after a stop signal (checkpoint saved).
    """
    args = build_parser().parse_intermixed_args(argv)
    try:
        parse_signals(args.stop_signals)
    except ValueError as error:
        raise UsageError(f"--stop-signals: {error}") from error
    if args.weights != "none" and not os.path.isfile(args.weights):
        raise UsageError(f"--weights file not found: {args.weights} (use 'none' to train from scratch)")
    if args.print_config:
        from pretrain.runtime.distributed import DistEnv

        cfg, precision, notes = _resolve(args, DistEnv())
        print(json.dumps(_resolved(args, cfg, precision, 1, notes), indent=2))
        return Outcome("printed", "printed the resolved config")
    _check_out(args)
    if args.num_gpus > 1 or args.num_machines > 1:
        return _launch(args)
    stop = stop or StopRequest()
    with stop.installed(parse_signals(args.stop_signals)):
        from pretrain.runtime.distributed import shutdown_distributed

        try:
            return _train(args, stop)
        finally:
            shutdown_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 when done or stopped after saving, 1 on a runtime error, 2 on a usage error."""
    return run_cli(PROG, lambda: run(argv) and 0)


if __name__ == "__main__":
    sys.exit(main())
