"""Mixed precision: the autocast context of a run's ``amp`` setting (imports torch only)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_for"]


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``amp`` is ``'bf16'``, else a disabled one (config's ``amp``)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
