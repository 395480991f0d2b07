"""``obs``: structured optimal brain surgeon. It is not a per-unit score: units are chosen greedily inside the
sequential pass from each layer's input Gram matrices, every removal followed by the optimal update of what
remains (:mod:`llmprune.structured.obs`). Registered here so the name is known everywhere methods are listed."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..arch.base import Slot
from ..calibration.calibrate import InputStats
from .base import register_criterion

__all__ = ["obs"]

#: marks a criterion that selects inside the sequential pass (pipeline and sequential check it)
SELECTS_IN_SEQUENCE = {"obs"}


@register_criterion("obs", needs_calibration=True,
                    description="structured optimal brain surgeon: greedy removal by output error after the optimal "
                                "refit (ZipLM / SlimGPT), Fisher-weighted with allocation fisher; always refits")
def obs(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None) -> torch.Tensor:
    raise ValueError("the obs method chooses units from Gram matrices inside the sequential pass; it has no "
                     "per-unit score (use it through llmprune.prune / llmprune prune, with allocation uniform, "
                     "error or fisher)")
