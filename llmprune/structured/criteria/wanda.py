"""Activation-aware criterion (Wanda-style, Sun et al. 2023), aggregated over a structured unit.

Each weight's importance is ``|W_ij| * ||X_j||``, with ``||X_j||`` the L2 norm of input feature ``j``
over the calibration tokens; a unit's score is the sum over all weights it owns. For a unit's rows
(q/k/v, gate/up) ``X`` is the layer's hidden input; for its columns (o_proj, down_proj) it is the unit's
own output, so heads and neurons that are rarely active score low even with large weights.

Example::

    scores = wanda(ffn.slots, ffn.num_neurons, layer_stats.inputs)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...arch.base import Slot
from ...calibration.calibrate import InputStats
from .base import register_criterion, slot_input_feature, slot_weights

__all__ = ["wanda"]


@register_criterion("wanda", needs_calibration=True, description="sum of |W| * ||X|| over the unit (activation-aware)")
def wanda(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None) -> torch.Tensor:
    if stats is None:
        raise ValueError("the wanda criterion needs calibration statistics (give calibration text)")
    total = torch.zeros(n_units)
    for slot in slots:
        if slot.module not in stats:
            raise ValueError(f"no calibration statistics for {type(slot.module).__name__} in this layer")
        w = slot_weights(slot, n_units)
        norm = slot_input_feature(slot, n_units, stats[slot.module].norm).to(w.device)
        total += (w.abs() * norm).sum(dim=(1, 2)).cpu()
    return total
