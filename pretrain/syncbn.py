"""BatchNorm with statistics summed over ranks on CPU (gloo) as well as GPU, for the SparK decoder."""

from __future__ import annotations

import torch
from torch import nn

from .sparse import masked_batch_norm, rebuild_as

__all__ = ["RankSyncedBatchNorm2d", "sync_batchnorm"]


class RankSyncedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are summed over all ranks (gloo on CPU as well as NCCL).

    ``nn.SyncBatchNorm`` refuses CPU tensors; this uses the same rank-summed, differentiable statistics as
    the sparse encoder's BatchNorm (:func:`pretrain.sparse.masked_batch_norm` with every site visible).
    Outside training it is a plain ``BatchNorm2d``. State-dict keys are those of ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return masked_batch_norm(self, x, None, sync=True)


def sync_batchnorm(module: nn.Module) -> int:
    """Replace every plain ``nn.BatchNorm2d`` below ``module`` by :class:`RankSyncedBatchNorm2d` in place.

    The new layers share the old parameters and buffers. Subclasses (the sparse encoder's BatchNorm, which
    already synchronises) are left alone. Returns the number of layers replaced.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, rebuild_as(child, RankSyncedBatchNorm2d))
                replaced += 1
    return replaced
