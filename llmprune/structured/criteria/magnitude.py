"""Magnitude criterion: the L2 (or L1) norm of all weights a unit owns.

Example::

    scores = magnitude_l2(attn.q_slots, attn.num_heads, None)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...arch.base import Slot
from ...calibration.calibrate import InputStats
from .base import register_criterion, slot_weights

__all__ = ["magnitude_l2", "magnitude_l1"]


@register_criterion("magnitude", needs_calibration=False, description="L2 norm of the unit's weights")
def magnitude_l2(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None = None) -> torch.Tensor:
    total = torch.zeros(n_units)
    for slot in slots:
        total += slot_weights(slot, n_units).pow(2).sum(dim=(1, 2)).cpu()
    return total.sqrt()


@register_criterion("magnitude_l1", needs_calibration=False, description="L1 norm of the unit's weights")
def magnitude_l1(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None = None) -> torch.Tensor:
    total = torch.zeros(n_units)
    for slot in slots:
        total += slot_weights(slot, n_units).abs().sum(dim=(1, 2)).cpu()
    return total
