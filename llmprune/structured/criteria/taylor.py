"""First-order Taylor criterion (LLM-Pruner, Ma et al. 2023): a unit's importance is the sum over the weights it
owns of ``|w · ∂L/∂w|``, the first-order estimate of the loss change when they are zeroed.

The gradients come from :func:`llmprune.calibration.gradients.taylor_statistics` (LM loss on the calibration windows),
already reduced to row and column sums per module, so scoring here only gathers the unit's rows or columns.

Example::

    scores = taylor(ffn.slots, ffn.num_neurons, layer_stats.inputs)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...arch.base import Slot
from ...calibration.calibrate import InputStats
from .base import register_criterion

__all__ = ["taylor"]


def _prepare(model: nn.Module, adapter, batches, progress: bool):
    from ...calibration.gradients import taylor_statistics

    return taylor_statistics(model, adapter, batches, progress=progress)


@register_criterion("taylor", needs_calibration=True, prepare=_prepare,
                    description="sum of |w * dL/dw| over the unit (first-order Taylor, LLM-Pruner)")
def taylor(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None) -> torch.Tensor:
    if stats is None:
        raise ValueError("the taylor criterion needs calibration data (give calibration text)")
    total = torch.zeros(n_units, dtype=torch.float64)
    for slot in slots:
        s = stats.get(slot.module)
        if s is None or s.grad_rows is None:
            raise ValueError(f"no Taylor gradients for {type(slot.module).__name__} in this layer")
        sums = s.grad_rows if slot.dim == "out" else s.grad_cols
        idx = slot.indices(torch.arange(n_units))
        total += sums.index_select(0, idx).reshape(n_units, slot.width).sum(1)
    return total.float()
