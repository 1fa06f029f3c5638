"""SparK pretraining as a task of the shared loop (:mod:`pretrain.runtime.loop`): the masked-patch loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .spark import SparK

__all__ = ["SparKTask"]


@dataclass
class SparKTask:
    """``loss(images, labels, generator)``: a random patch mask drawn from ``generator`` (the loop seeds it per
    micro-batch), the sparse encoding and the masked-patch loss. Labels are not used."""

    model: nn.Module  # the SparK model, DDP-wrapped when several ranks run
    spark: SparK  # the SparK model itself (draws the masks)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        active = self.spark.mask(images.shape[0], images.device, generator=generator)
        return self.model(images, active)
