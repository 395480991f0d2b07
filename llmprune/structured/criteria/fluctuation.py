"""Fluctuation criterion (FLAP, An et al., AAAI 2024).

A unit matters when removing it changes the layer output *unpredictably*: the part of its output that
is constant over tokens could be folded into a bias, the part that fluctuates cannot. For each input
column ``j`` of the projection that brings the unit's output back to the residual stream (o_proj for a
head, down_proj for a neuron) the score is ``Var(X_j) * ||W[:, j]||^2`` over calibration tokens; a unit
sums its columns. Slots that only read the hidden state (q/k/v, gate/up rows) carry no fluctuation term,
so a KV head scores 0 on its own and is ranked through its query heads.

Example::

    scores = fluctuation(ffn.slots, ffn.num_neurons, layer_stats.inputs)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...arch.base import Slot
from ...calibration.calibrate import InputStats
from .base import register_criterion, slot_input_feature, slot_weights

__all__ = ["fluctuation"]


@register_criterion("flap", needs_calibration=True,
                    description="FLAP fluctuation: Var(X_j) * ||W[:, j]||^2 over the unit's output columns")
def fluctuation(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None) -> torch.Tensor:
    if stats is None:
        raise ValueError("the flap criterion needs calibration statistics (give calibration text)")
    total = torch.zeros(n_units, dtype=torch.float64)
    for slot in slots:
        if slot.dim != "in":
            continue
        if slot.module not in stats:
            raise ValueError(f"no calibration statistics for {type(slot.module).__name__} in this layer")
        w = slot_weights(slot, n_units)  # [units, width, out]
        var = slot_input_feature(slot, n_units, stats[slot.module].variance).to(w.device)  # [units, width, 1]
        total += (var.squeeze(-1).double() * w.double().pow(2).sum(-1)).sum(-1).cpu()
    return total.float()
