"""``python -m downstream.det.train``: fine-tune Mask R-CNN on COCO from SparK weights (tables 9 and 10).

    python -m downstream.det.train --config mask_rcnn_R_50_FPN_1x --weights r50.pkl --out runs/det-r50 \\
        --coco-root /data/coco [--resume] [--num-gpus 8 --num-machines 2 --machine-rank 0 --dist-url tcp://h:port] \\
        [KEY VALUE ...]

The stage contract of :mod:`pretrain.runtime.stage` (the same ``--resume`` forms, ``--print-config``, stop
signals, ``--amp``/``--channels-last``, :class:`~pretrain.runtime.stage.Outcome` as pretraining and fine-tuning);
the training itself is Detectron2's trainer and hooks (:mod:`.engine`). ``--config`` names the Detectron2 config;
the resolved one (``KEY VALUE`` overrides applied, BatchNorm kinds adapted to the ranks and device) is part of the
frozen :class:`DetConfig` (``detectron2``).

Ranks: ``--num-gpus N`` (per machine) > 1 or ``--num-machines`` > 1 spawn GPU workers through Detectron2's
``launch``; inside a SLURM step with several tasks, or under torchrun, every process is already a rank: the
process group comes from the environment (:mod:`pretrain.runtime.distributed`) and no process is spawned.
The run folder receives ``config.yaml`` (Detectron2's resolved config, what ``downstream.det.evaluate`` reads),
``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-last.pth``, ``model_final.pth``,
``inference/`` and, when done, ``result.json`` with box and mask AP (pycocotools, percent).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pretrain.runtime.config import ConfigError, ConfigSchema, RunConfig, require_all, run_record, setting
from pretrain.runtime.errors import RunError, UsageError
from pretrain.runtime.io import atomic_write_json, atomic_write_text, join
from pretrain.runtime.result import RESULT, write_result
from pretrain.runtime.signals import StopRequest, parse_signals
from pretrain.runtime.stage import Outcome, RunTarget, StageCommand, find_resume_path, prepare_run, stopped_outcome

from .config_files import adapt_norms, lookup, read_plain, shipped_configs

__all__ = ["COMMAND", "DetCommand", "DetConfig", "build_parser", "main", "run", "train_rank"]

logger = logging.getLogger(__name__)
D2_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")  # a Detectron2 config key (SOLVER.MAX_ITER)


@dataclass(frozen=True, kw_only=True)
class DetConfig(RunConfig):
    """A detection run: the suite's settings (run folder, resume, precision, stop signals...), the weights and data,
    the launch shape, and the resolved Detectron2 config (``preset`` is the ``--config`` it came from)."""

    weights: str = setting("pretrained weights: a Detectron2 .pkl (downstream.convert detectron2) or model .pth, or "
                           "any file python -m downstream.convert reads (encoder_timm.pth, a SparK "
                           "checkpoint-last.pth, the released SparK files...: timm backbone or ResNet); 'none' trains "
                           "from scratch", "", metavar="W")
    trust_weights: bool = setting("unpickle --weights fully even if it holds Python objects beyond tensors and plain "
                                  "values (that can run code: only for files you trust)", False)
    coco_root: str = setting("COCO folder (annotations/instances_<split>.json, <split>/) for the config's "
                             "coco_<year>_<train|val> datasets; default: Detectron2's DETECTRON2_DATASETS/coco", "",
                             metavar="DIR")
    num_gpus: int = setting("GPU workers per machine to spawn (Detectron2's launch)", 1, metavar="N")
    num_machines: int = setting("machines of a launch", 1, metavar="M")
    machine_rank: int = setting("this machine's rank in a launch", 0, metavar="R")
    dist_url: str = setting("rendezvous of a launch (tcp://host:port; auto: a free local port, one machine)", "auto",
                            metavar="U")
    opts: tuple[str, ...] = setting("Detectron2 config overrides, e.g. SOLVER.MAX_ITER 1000 SOLVER.IMS_PER_BATCH 8",
                                    (), positional=True, metavar="KEY VALUE")
    # --- derived at resolution (not settable)
    detectron2: dict[str, Any] = setting("the resolved Detectron2 config", {}, derived=True)
    adapted: tuple[str, ...] = setting("what the resolution changed for the run's ranks and device", (),
                                       derived=True)

    @property
    def launches(self) -> bool:
        """Whether this process spawns the ranks (Detectron2's ``launch``) instead of being one."""
        return self.num_gpus > 1 or self.num_machines > 1

    def validate(self) -> None:
        super().validate()
        require_all([
            (self.num_gpus >= 1 and self.num_machines >= 1, "--num-gpus and --num-machines must be positive"),
            (0 <= self.machine_rank < self.num_machines, f"--machine-rank must be in [0, {self.num_machines})"),
            (self.num_machines == 1 or self.dist_url != "auto",
             "--num-machines > 1 needs --dist-url tcp://HOST:PORT of machine 0"),
            (len(self.opts) % 2 == 0, f"config overrides come as KEY VALUE pairs; got {len(self.opts)} items: "
                                      f"{list(self.opts)}"),
        ])


SCHEMA: ConfigSchema[DetConfig] = ConfigSchema(DetConfig, None)


def _resolved_detectron2(cfg: DetConfig, world_size: int, device: str) -> tuple[dict[str, Any], list[str]]:
    """Detectron2's config of ``cfg`` (file + overrides + the suite's flags), adapted to the ranks, as data."""
    import yaml

    from .config import adapt_to_run, load_config

    d2 = load_config(cfg.preset, cfg.opts)
    d2.OUTPUT_DIR = cfg.out
    d2.MODEL.WEIGHTS = "" if cfg.weights == "none" else cfg.weights
    notes = adapt_to_run(d2, world_size, device)
    return yaml.safe_load(d2.dump()), notes


def _planned_detectron2(cfg: DetConfig, world_size: int, device: str) -> tuple[dict[str, Any], list[str]]:
    """The values the config file sets, adapted to the ranks: the sweep's dry run, without Detectron2."""
    values = read_plain(cfg.preset, cfg.opts)
    return values, adapt_norms(values, world_size, device)


class DetCommand(StageCommand):
    """``python -m downstream.det.train``: the stage contract of :mod:`pretrain.runtime.stage` for detection."""

    prog = "python -m downstream.det.train"
    description = ("Fine-tune Mask R-CNN on COCO from SparK weights (tables 9, 10) with Detectron2; evaluate box and "
                   "mask AP with pycocotools.")
    epilog = "KEY VALUE pairs override the Detectron2 config, e.g. SOLVER.MAX_ITER 1000 SOLVER.IMS_PER_BATCH 8"
    schema = SCHEMA
    config_required = True
    config_help = f"a shipped Detectron2 config ({', '.join(shipped_configs())}) or a YAML file"
    intermixed = True
    runner = "downstream.det.train:train_rank"

    def resolve(self, preset: str | None, overrides: Mapping[str, Any], target: RunTarget) -> DetConfig:
        cfg = SCHEMA.resolve(preset, overrides)
        world_size = cfg.num_gpus * cfg.num_machines if cfg.launches else target.world_size
        device = "cuda" if cfg.launches else target.device
        build = _planned_detectron2 if target.planning else _resolved_detectron2
        d2, notes = build(cfg, world_size, device)
        images = lookup(d2, "SOLVER.IMS_PER_BATCH", 16)
        if images % world_size:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH {images} is not divisible by {world_size} ranks")
        return dataclasses.replace(cfg.derive(world_size), detectron2=d2, adapted=tuple(notes))

    def check_run(self, cfg: DetConfig) -> None:
        if D2_KEY.fullmatch(cfg.resume) and not os.path.exists(cfg.resume):
            raise ConfigError(f"--resume took {cfg.resume!r} as its checkpoint: before KEY VALUE pairs write "
                              "--resume auto")
        super().check_run(cfg)
        if not cfg.weights:
            raise ConfigError("--weights is required: a Detectron2 .pkl, a SparK checkpoint or encoder_timm.pth, a "
                              "Detectron2 model .pth, or none to train from scratch")
        if cfg.weights != "none" and not os.path.isfile(cfg.weights):
            raise ConfigError(f"--weights file not found: {cfg.weights} (use 'none' to train from scratch)")

    def facts(self, cfg: DetConfig, target: RunTarget) -> dict[str, Any]:
        target = RunTarget(cfg.world_size, "cuda" if cfg.launches else target.device)
        return super().facts(cfg, target)

    def summary(self, cfg: DetConfig) -> str:
        images = lookup(cfg.detectron2, "SOLVER.IMS_PER_BATCH", 16)
        norms = sorted({str(lookup(cfg.detectron2, key)) for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM",
                                                                    "MODEL.TIMM.NORM") if lookup(cfg.detectron2, key)})
        return (f"{images} images per iteration = {images // cfg.world_size} x {cfg.world_size} rank(s), BASE_LR "
                f"{lookup(cfg.detectron2, 'SOLVER.BASE_LR', '?')}, norms {', '.join(norms) or 'as the model'}")

    def join(self, cfg: DetConfig) -> Any:
        """This rank: from the process group Detectron2's ``launch`` started, else from the environment (with
        Detectron2's local process group set up for SLURM / torchrun ranks)."""
        import torch.distributed as dist

        from pretrain.runtime.distributed import DistEnv, init_distributed

        from .compat import setup_local_process_group

        if dist.is_available() and dist.is_initialized():  # a worker of Detectron2's launch
            import torch
            from detectron2.utils import comm

            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
            return DistEnv(dist.get_rank(), dist.get_world_size(), comm.get_local_rank(), device)
        env = init_distributed(cfg.device, cfg.dist_timeout_min)
        if env.distributed:
            setup_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or None)
        return env

    def start(self, cfg: DetConfig, stop: StopRequest) -> Outcome:
        return _launch(cfg) if cfg.launches else super().start(cfg, stop)


def _prepare_data(cfg: Any, coco_root: str) -> dict[str, dict]:
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


def _model_name(d2: Any) -> str:
    return d2.MODEL.TIMM.NAME if "timm" in d2.MODEL.BACKBONE.NAME else f"resnet{d2.MODEL.RESNETS.DEPTH}"


def train_rank(cfg: DetConfig, env: Any, stop: StopRequest) -> Outcome:
    """One rank of a run (the whole run on one process)."""
    import torch
    from detectron2.utils.env import seed_all_rng

    from .config import from_resolved
    from .engine import DetTrainer
    from .evaluation import det_metrics, format_table

    precision = prepare_run(cfg, env.device)
    resume_from = find_resume_path(cfg.out, cfg.resume)
    d2 = from_resolved(cfg.detectron2)
    counts = _prepare_data(d2, cfg.coco_root)
    record = run_record(cfg, precision=precision.to_dict())
    if env.is_main:
        atomic_write_text(join(cfg.out, "config.yaml"), d2.dump())
        atomic_write_json(join(cfg.out, "config.json"), record)
    for note in cfg.adapted:
        logger.info("config adapted: %s", note)
    seed_all_rng(None if d2.SEED < 0 else d2.SEED + env.rank)
    torch.backends.cudnn.benchmark = d2.CUDNN_BENCHMARK
    started = time.monotonic()
    trainer = DetTrainer(d2, precision, stop)
    logger.info("%s", trainer.resume_or_load(resume_from, weights=cfg.weights, trust=cfg.trust_weights))
    try:
        finished = trainer.train()
    except FloatingPointError as error:
        raise RunError(f"{error}".splitlines()[0] + f"; the last checkpoint in {cfg.out} is kept") from error
    if not finished:
        return stopped_outcome(cfg.out, stop.signal_name, f"after iteration {trainer.iter + 1} of {d2.SOLVER.MAX_ITER}")
    if not env.is_main:
        return Outcome("completed", f"done: {d2.SOLVER.MAX_ITER} iterations", cfg.out)
    metrics = det_metrics(trainer.last_results)  # the evaluation's numbers live on the main rank
    extra = {"iterations": d2.SOLVER.MAX_ITER, "train_time_s": round(time.monotonic() - started, 1)}
    write_result(cfg.out, "det", _model_name(d2), {**metrics, **extra}, record,
                 inputs={"weights": cfg.weights, "data": {"coco_root": cfg.coco_root or None, "splits": counts},
                         "resumed_from": resume_from},
                 outputs={"weights": join(cfg.out, "model_final.pth"), "config": join(cfg.out, "config.yaml")})
    print(format_table(metrics))
    return Outcome("completed", f"done: {d2.SOLVER.MAX_ITER} iterations; box AP {metrics.get('bbox_AP')}, mask AP "
                                f"{metrics.get('segm_AP')}; results in {join(cfg.out, RESULT)}", cfg.out)


def _launched_worker(cfg: DetConfig) -> None:
    """Body of a GPU worker spawned by Detectron2's ``launch``."""
    stop = StopRequest()
    with stop.installed(parse_signals(cfg.stop_signals)):
        StageCommand.start(COMMAND, cfg, stop)


def _forward_to_children(signum: int, frame: object) -> None:
    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)


def _launch(cfg: DetConfig) -> Outcome:
    """Spawn ``--num-gpus`` workers on this machine (Detectron2's ``launch``); stop signals are forwarded."""
    import torch
    from detectron2.engine import launch

    if torch.cuda.device_count() < cfg.num_gpus:
        raise UsageError(f"--num-gpus {cfg.num_gpus}: {torch.cuda.device_count()} GPUs visible (Detectron2's launch "
                         "spawns one process per GPU; CPU ranks come from torchrun or a SLURM step instead)")
    signals = parse_signals(cfg.stop_signals)
    previous = {sig: signal.signal(sig, _forward_to_children) for sig in signals}
    try:
        launch(_launched_worker, cfg.num_gpus, num_machines=cfg.num_machines, machine_rank=cfg.machine_rank,
               dist_url=cfg.dist_url, args=(cfg,))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if os.path.isfile(join(cfg.out, RESULT)):
        return Outcome("completed", f"done; results in {join(cfg.out, RESULT)}", cfg.out)
    return Outcome("stopped", f"workers ended without a result: run again with --resume auto to continue {cfg.out}",
                   cfg.out)


COMMAND = DetCommand()
build_parser, run, main = COMMAND.build_parser, COMMAND.run, COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
