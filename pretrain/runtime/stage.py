"""What every stage's command does around its training: parse, resolve, set up, run, report.

A stage (pretraining, fine-tuning) describes its command as a :class:`StageCommand`: its parser, how a
config is resolved from the parsed flags, and ``execute(cfg, env, stop) -> Outcome``. The command then
offers the two entry points of the stage contract:

- ``run(argv) -> Outcome`` (in-process, for the sweep's submitit jobs): raises :class:`UsageError` /
  :class:`SuiteError` subclasses on bad input;
- ``main(argv) -> int`` (the CLI): the same, with one-line errors and exit codes 0 / 1 / 2.

``--print-config`` prints the resolved config as JSON and returns an ``Outcome`` with status ``printed``.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from iopath.common.file_io import PathManager

from .cli import ArgumentParser, run_cli, setup_logging
from .config import ConfigError, RunConfig
from .signals import StopRequest

__all__ = ["Outcome", "StageCommand", "find_resume_path", "parser_with_config", "prepare_run",
           "record_precision", "seed_everything"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How a stage run ended: ``completed`` (``result.json`` written), ``stopped`` (a stop signal: checkpoint
    saved, run again with ``--resume auto``) or ``printed`` (``--print-config``)."""

    status: str
    message: str
    out: str = ""
    signal_name: str | None = None


def find_resume_path(out: str, resume: str, pm: PathManager | None = None) -> str | None:
    """The checkpoint a run starts from: ``resume='auto'`` -> OUT's last checkpoint if any; a path -> that file.

    Raises :class:`ConfigError` if the path is missing, or if OUT already holds a checkpoint and ``resume`` is
    empty (so a finished or running run is never overwritten by accident).
    """
    from .checkpoint import find_checkpoint

    pm = pm or PathManager()
    existing = find_checkpoint(out, pm)
    if resume == "auto":
        return existing
    if resume:
        if not pm.exists(resume):
            raise ConfigError(f"--resume checkpoint not found: {resume}")
        return resume
    if existing:
        raise ConfigError(f"{out} already holds {existing}; pass --resume auto to continue it or choose another --out")
    return None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def record_precision(cfg: RunConfig, device: Any):  # -> Precision
    """Resolve the precision of ``cfg`` on ``device`` (a torch device or its type) and store it in ``cfg.precision``."""
    from .precision import choose_precision

    precision = choose_precision(device, cfg.amp, cfg.channels_last)
    cfg.precision = precision.to_dict()
    return precision


def prepare_run(cfg: RunConfig, device: Any):  # -> Precision
    """Set determinism and :func:`record_precision` of ``cfg`` on ``device``.

    Logs the choice as the run's first line, and its warning (bf16 requested without native bf16).
    """
    import torch

    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    precision = record_precision(cfg, device)
    logger.info("%s", precision.describe())
    if precision.warning:
        logger.warning("%s", precision.warning)
    return precision


@dataclass(frozen=True)
class StageCommand:
    """A stage's command line: ``prog``, ``build_parser()`` (with ``--print-config`` and the config flags),
    ``resolve(args, world_size) -> cfg`` (raises :class:`ConfigError`), ``execute(cfg, env, stop) -> Outcome``."""

    prog: str
    build_parser: Callable[[], argparse.ArgumentParser]
    resolve: Callable[[dict[str, Any], int], RunConfig]
    execute: Callable[..., Outcome]

    def parse(self, argv: Sequence[str] | None) -> tuple[RunConfig, bool]:
        """``(resolved config, print_config)``; :class:`ConfigError` for a bad config, SystemExit(2) for bad flags."""
        from .distributed import world_size_from_environment

        args = vars(self.build_parser().parse_args(argv))
        print_config = args.pop("print_config", False)
        return self.resolve(args, world_size_from_environment()), print_config

    def run(self, argv: Sequence[str] | None = None, stop: StopRequest | None = None) -> Outcome:
        """Parse, resolve and run the stage in this process (every rank of a distributed run calls it)."""
        from .distributed import init_distributed, shutdown_distributed

        cfg, print_config = self.parse(argv)
        if print_config:
            import torch

            record_precision(cfg, "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
            print(cfg.to_json())
            return Outcome("printed", "printed the resolved config")
        if not cfg.out:
            raise ConfigError("--out is required (the run folder)")
        env = init_distributed(cfg.device, cfg.dist_timeout_min)
        setup_logging(env.is_main)
        try:
            outcome = self.execute(cfg, env, stop or StopRequest())
        finally:
            shutdown_distributed()
        if env.is_main:
            print(outcome.message)
        return outcome

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The CLI: exit 0 when done or stopped after saving, 1 on a runtime error, 2 on a usage error."""
        return run_cli(self.prog, lambda: self.run(argv) and 0)


def parser_with_config(prog: str, description: str, add_config: Callable[[argparse.ArgumentParser], None],
                       preset_flag: Mapping[str, Any] | None = None) -> ArgumentParser:
    """A stage parser: ``--print-config``, an optional preset/recipe flag, then the config flags."""
    parser = ArgumentParser(prog=prog, description=description)
    if preset_flag:
        parser.add_argument(preset_flag["flag"], **{k: v for k, v in preset_flag.items() if k != "flag"})
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_config(parser)
    return parser
