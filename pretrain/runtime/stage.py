"""The stage contract: what every stage's command does around its work, the same way for all three.

A stage (pretraining, fine-tuning, detection) is a :class:`StageCommand` subclass: its program name, its config
schema and ``--config`` flag (a preset, recipe or Detectron2 config; ``--preset``/``--recipe`` are aliases), how a
config is resolved for a :class:`RunTarget`, and ``execute(cfg, env, stop) -> Outcome``. The base class is the one
reader of stage flags and offers the entry points:

- ``run(argv) -> Outcome`` (in-process, for the sweep's submitit jobs): parse, validate every flag, resolve and
  freeze the config, then ``--print-config`` or the run (stop signals installed, ranks joined); raises
  :class:`UsageError` / :class:`SuiteError` subclasses on bad input;
- ``main(argv) -> int`` (the CLI): the same, with one-line errors and exit codes 0 / 1 / 2;
- ``plan(argv, target)`` (the sweep's dry run): the config a job will get on its ranks, without torch;
- ``resume_argv`` and ``checkpoint_files``: how the sweep resumes a stage and finds its checkpoints.

Every stage takes ``--resume`` bare (= ``auto``: continue from OUT's last checkpoint if any), ``--resume auto``
or ``--resume PATH``; ``--print-config [--world-size N] [--device cuda]`` prints the config as it will run on N
ranks of that device, with the precision chosen there beside it. Importing this module imports no torch.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from iopath.common.file_io import PathManager

from .cli import ArgumentParser, run_cli, setup_logging
from .config import ConfigError, ConfigSchema, RunConfig, run_record
from .io import CHECKPOINT, CHECKPOINT_FILES, find_checkpoint, join
from .signals import StopRequest, parse_signals

__all__ = ["Outcome", "RunTarget", "StageCommand", "find_resume_path", "prepare_run", "stopped_outcome",
           "target_precision"]

logger = logging.getLogger(__name__)
EXIT_CODES = "Exit codes: 0 done (or stopped by a signal after saving), 1 runtime error, 2 usage error."


@dataclass(frozen=True)
class Outcome:
    """How a stage run ended: ``completed`` (``result.json`` written), ``stopped`` (a stop signal: checkpoint
    saved, run again with ``--resume``) or ``printed`` (``--print-config``)."""

    status: str
    message: str
    out: str = ""
    signal_name: str | None = None


@dataclass(frozen=True)
class RunTarget:
    """Where a config will run: ``world_size`` ranks on ``device`` (``cpu`` or ``cuda``). ``planning``: resolved
    for the sweep's dry run, without torch (no model is built, no file is checked)."""

    world_size: int = 1
    device: str = "cpu"
    planning: bool = False


def stopped_outcome(out: str, signal_name: str | None, where: str) -> Outcome:
    """The outcome of a run a stop signal ended after saving its checkpoint (every stage says it the same way)."""
    return Outcome("stopped", f"stopped by {signal_name} {where}: saved {join(out, CHECKPOINT)}; run again with "
                              "--resume auto to continue", out, signal_name)


def find_resume_path(out: str, resume: str, pm: PathManager | None = None) -> str | None:
    """The checkpoint a run starts from: ``resume='auto'`` -> OUT's last checkpoint if any; a path -> that file.

    Raises :class:`ConfigError` if the path is missing, or if OUT already holds a checkpoint and ``resume`` is
    empty (so a finished or running run is never overwritten by accident).
    """
    pm = pm or PathManager()
    existing = find_checkpoint(out, pm) if out else None
    if resume == "auto":
        return existing
    if resume:
        if not pm.exists(resume):
            raise ConfigError(f"--resume checkpoint not found: {resume}")
        return resume
    if existing:
        raise ConfigError(f"{out} already holds {existing}; pass --resume auto to continue it or choose another --out")
    return None


def target_precision(cfg: RunConfig, target: RunTarget):  # -> Precision
    """The precision ``cfg`` gets on ``target``'s device. For ``cuda`` where no GPU is visible (a login node
    printing a GPU job's config), a GPU with bf16 tensor cores (compute capability 8.0+) is assumed, and said."""
    import torch

    from .precision import Capabilities, choose_precision, resolve_precision

    if target.device == "cuda" and not torch.cuda.is_available():
        caps = Capabilities("cuda", True, "a GPU of compute capability 8.0+ (assumed: none visible here; older "
                                          "GPUs get fp32 NCHW)")
        return resolve_precision(cfg.amp, cfg.channels_last, caps)
    return choose_precision(target.device, cfg.amp, cfg.channels_last)


def prepare_run(cfg: RunConfig, device: Any):  # -> Precision
    """Set determinism and choose the precision of ``cfg`` on ``device`` (a torch device or its type).

    Logs the choice as the run's first line, and its warning (bf16 requested without native bf16). The choice is
    recorded beside the config (:func:`pretrain.runtime.config.run_record`), never written into it.
    """
    import torch

    from .precision import choose_precision

    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    precision = choose_precision(device, cfg.amp, cfg.channels_last)
    logger.info("%s", precision.describe())
    if precision.warning:
        logger.warning("%s", precision.warning)
    return precision


@dataclass(frozen=True)
class Flags:
    """The stage-contract flags of one command line besides the config: ``--print-config`` and the target."""

    print_config: bool
    target: RunTarget


def _auto_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class StageCommand:
    """A stage's command line and run (see the module docstring); subclasses set the class attributes and
    implement :meth:`resolve` and :meth:`execute`."""

    prog: str = ""
    description: str = ""
    schema: ConfigSchema
    config_aliases: tuple[str, ...] = ()  # --preset / --recipe
    config_default: str | None = None
    config_help: str = ""
    config_required: bool = False
    show_presets: tuple[str, ...] = ()  # presets whose values --help shows
    epilog: str | None = None
    intermixed: bool = False  # flags may follow trailing positional words (Detectron2's KEY VALUE pairs)
    resume_argv: tuple[str, ...] = ("--resume", "auto")  # what the sweep appends to continue a run
    checkpoint_files: tuple[str, ...] = CHECKPOINT_FILES  # their presence in OUT means a run can resume
    runner: str = ""  # "module:function(cfg, env, stop) -> Outcome", imported when a run starts (torch, timm)

    # --- what a stage implements

    def resolve(self, preset: str | None, overrides: Mapping[str, Any], target: RunTarget) -> RunConfig:
        """The frozen config of ``preset`` + ``overrides`` on ``target``; :class:`ConfigError` if it cannot run."""
        raise NotImplementedError

    def execute(self, cfg: RunConfig, env: Any, stop: StopRequest) -> Outcome:
        """Run ``cfg`` on this rank (``env``: its :class:`pretrain.runtime.distributed.DistEnv`): :attr:`runner`."""
        module, name = self.runner.split(":")
        return getattr(importlib.import_module(module), name)(cfg, env, stop)

    def synced_batchnorm(self, cfg: RunConfig, world_size: int) -> bool | None:
        """Whether the run synchronises BatchNorm statistics over its ranks (None: the stage does not say)."""
        return None

    def check_run(self, cfg: RunConfig) -> None:
        """What a run (not ``--print-config``) needs before anything is built: ``--out``, a usable ``--resume``.
        Stages add theirs (``--data``, ``--weights``...). Raises :class:`ConfigError`."""
        if not cfg.out:
            raise ConfigError("--out is required (the run folder)")
        find_resume_path(cfg.out, cfg.resume)

    def facts(self, cfg: RunConfig, target: RunTarget) -> dict[str, Any]:
        """What ``--print-config`` shows beside the config: the precision chosen on the target's device; stages
        add what else the target decides (SyncBN...)."""
        synced = self.synced_batchnorm(cfg, target.world_size)
        return {"precision": target_precision(cfg, target).to_dict(),
                **({"synced_batchnorm": synced} if synced is not None else {})}

    def summary(self, cfg: RunConfig) -> str:
        """One line on how ``cfg`` runs on its ranks (the sweep's dry run)."""
        describe = getattr(cfg, "describe_batch", None)
        synced = self.synced_batchnorm(cfg, cfg.world_size)
        return (describe() if describe else f"{cfg.world_size} rank(s)") + (
            "" if synced is None else f", BatchNorm {'synchronised over ranks' if synced else 'per rank'}")

    def join(self, cfg: RunConfig) -> Any:
        """This process's rank (:class:`pretrain.runtime.distributed.DistEnv`), joining the process group."""
        from .distributed import init_distributed

        return init_distributed(cfg.device, cfg.dist_timeout_min)

    def start(self, cfg: RunConfig, stop: StopRequest) -> Outcome:
        """Join the ranks, execute, leave; the main rank prints the outcome (stages that spawn ranks override)."""
        from .distributed import shutdown_distributed

        env = self.join(cfg)
        setup_logging(env.is_main)
        try:
            outcome = self.execute(cfg, env, stop)
        finally:
            shutdown_distributed()
        if env.is_main:
            print(outcome.message)
        return outcome

    # --- the contract

    def build_parser(self, argv: Sequence[str] | None = None) -> ArgumentParser:
        """The stage's parser. With ``--model`` and/or ``--config`` in ``argv``, the help shows the values that
        config gives that model (``per_model`` entries applied), else each of :attr:`show_presets` for its own
        model."""
        pre = ArgumentParser(prog=self.prog, add_help=False, allow_abbrev=False)  # its errors: one line too
        pre.add_argument("--config", *self.config_aliases, dest="config")
        pre.add_argument("--model")
        known, _ = pre.parse_known_args(argv)
        parser = ArgumentParser(prog=self.prog, description=f"{self.description} {EXIT_CODES}", epilog=self.epilog)
        parser.add_argument("--config", *self.config_aliases, dest="config", default=self.config_default,
                            required=self.config_required, metavar="NAME|PATH", help=self.config_help)
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved config as JSON (and the precision it gets) and exit")
        parser.add_argument("--world-size", type=int, metavar="N",
                            help="with --print-config: resolve for N ranks (global batch, accumulation, SyncBN, lr) "
                                 "as the job you are about to submit; a run takes its ranks from torchrun or SLURM")
        shown = (known.config,) if known.config and self.show_presets else self.show_presets
        self.schema.add_arguments(parser, shown, known.model)
        return parser

    def _arguments(self, argv: Sequence[str] | None) -> tuple[str | None, dict[str, Any], int | None, bool]:
        parser = self.build_parser(argv)
        args = vars(parser.parse_intermixed_args(argv) if self.intermixed else parser.parse_args(argv))
        return args.pop("config"), args, args.pop("world_size"), args.pop("print_config")

    def parse(self, argv: Sequence[str] | None) -> tuple[RunConfig, Flags]:
        """``(frozen config, flags)``; :class:`ConfigError` for a bad config, SystemExit(2) for bad flags."""
        from .distributed import world_size_from_environment

        preset, overrides, world_size, print_config = self._arguments(argv)
        ranks = world_size_from_environment()
        if world_size is not None:
            if world_size < 1:
                raise ConfigError(f"--world-size must be positive, got {world_size}")
            if not print_config and world_size != ranks:
                raise ConfigError(f"--world-size {world_size} describes a job for --print-config; this run has "
                                  f"{ranks} rank(s) from its environment (torchrun or SLURM)")
        device = _auto_device(overrides.get("device") or self.schema.cls.__dataclass_fields__["device"].default)
        target = RunTarget(world_size or ranks, device)
        return self.resolve(preset, overrides, target), Flags(print_config, target)

    def plan(self, argv: Sequence[str], target: RunTarget) -> RunConfig:
        """The config of ``argv`` on ``target`` as the sweep's dry run shows it (no torch, nothing checked on
        disk). Bad flags exit like the CLI (SystemExit(2), one line on stderr)."""
        preset, overrides, _, _ = self._arguments(argv)
        return self.resolve(preset, overrides, RunTarget(target.world_size, target.device, planning=True))

    def run(self, argv: Sequence[str] | None = None, stop: StopRequest | None = None) -> Outcome:
        """Parse, resolve and run the stage in this process (every rank of a distributed run calls it)."""
        cfg, flags = self.parse(argv)
        if flags.print_config:
            print(json.dumps(run_record(cfg, **self.facts(cfg, flags.target)), indent=2))
            return Outcome("printed", "printed the resolved config")
        self.check_run(cfg)
        stop = stop or StopRequest()
        with stop.installed(parse_signals(cfg.stop_signals)):
            return self.start(cfg, stop)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The CLI: exit 0 when done or stopped after saving, 1 on a runtime error, 2 on a usage error."""
        return run_cli(self.prog, lambda: self.run(argv) and 0)
