"""Process groups from torchrun or SLURM, DDP wrapping, and rank-wide reductions.

Ranks come from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``) or, inside a
SLURM step (``srun`` or a submitit job), from submitit's :class:`TorchDistributedEnvironment`; otherwise the
run is a single process. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from submitit.helpers import TorchDistributedEnvironment
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "TORCH_LAUNCH_VARIABLES",
    "DistEnv",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "freeze_unused_parameters",
    "init_distributed",
    "shutdown_distributed",
    "world_size_from_environment",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the number of ranks, its local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


TORCH_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _in_slurm_step() -> bool:
    """True inside an ``srun`` step or a submitit SLURM job (not in the batch script of ``sbatch`` itself)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" or "SLURM_STEP_ID" in os.environ


def _export_slurm_variables() -> None:
    """Export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` from the SLURM step via submitit.

    Called only when ``RANK`` is unset, so any other of these variables was inherited from the shell that
    submitted the job (sbatch exports its environment) and describes another launch: it is replaced.
    """
    for key in TORCH_LAUNCH_VARIABLES:
        os.environ.pop(key, None)
    if "SUBMITIT_EXECUTOR" not in os.environ:
        os.environ["SUBMITIT_EXECUTOR"] = "slurm"  # a plain srun step: let submitit read the SLURM_* variables
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no GPU is visible")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def world_size_from_environment() -> int:
    """Number of ranks that torchrun or the SLURM step launched (1 outside both).

    Inside a SLURM step without torchrun's variables, exports them from SLURM's first (via submitit).
    """
    if "RANK" not in os.environ and _in_slurm_step():
        _export_slurm_variables()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", timeout_min: int = 30) -> DistEnv:
    """Join the process group described by the environment (or none) and pick this rank's device."""
    world_size = world_size_from_environment()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=chosen if chosen.type == "cuda" else None)
        logger.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, chosen)
    return DistEnv(rank, world_size, local_rank, chosen)


def shutdown_distributed() -> None:
    """Leave the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_running() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (in place; the tensor itself on a single process)."""
    if _group_running():
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` on a single process)."""
    if not _group_running():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank (no-op on a single process)."""
    if _group_running():
        dist.barrier()


def freeze_unused_parameters(model: nn.Module, images: torch.Tensor) -> list[str]:
    """Find parameters the training loss never reaches and stop their gradients; returns their names.

    timm models built with ``num_classes=0`` keep layers that ``forward_intermediates`` skips (EfficientNet's
    ``conv_head``/``bn2``, ConvNeXt's ``head.norm``); DDP fails on parameters without gradients. One dry
    forward/backward on ``images`` finds them; buffers (BatchNorm statistics), gradients and the RNG are
    restored afterwards, so the dry run leaves no trace. Every rank must call this (the sparse BatchNorm
    synchronises in the forward pass).
    """
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        model(images).backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """``DistributedDataParallel(model)`` when several ranks run, else ``model`` itself.

    Call :func:`freeze_unused_parameters` first: DDP then only tracks parameters that get gradients.
    """
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
