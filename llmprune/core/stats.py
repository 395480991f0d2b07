"""The statistics records that calibration fills and criteria read: running sums of one module's input
features (:class:`InputStats`) and one decoder layer's statistics (:class:`LayerStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import all_reduce_sum, world

__all__ = ["InputStats", "LayerStats"]


@dataclass
class InputStats:
    """Running sums over calibration tokens of one module's input features (float64)."""

    count: int = 0
    sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    #: row / column sums of the first-order Taylor importance |W * dL/dW| (``llmprune.calibration.gradients``), if gathered
    grad_rows: torch.Tensor | None = None
    grad_cols: torch.Tensor | None = None
    #: single-unit performance (``llmprune.calibration.single_unit``): per-label input sums [in, K], label counts [K],
    #: readout logits per input feature [K, in]
    label_sums: torch.Tensor | None = None
    label_counts: torch.Tensor | None = None
    readout: torch.Tensor | None = None
    #: single-unit ``solo-loss`` scores: the mean next-token loss each unit's write alone removes, per labelled
    #: position [units of this output projection]
    solo_gain: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        s, q = x.sum(0).cpu(), (x * x).sum(0).cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.sq_sum = q if self.sq_sum is None else self.sq_sum + q
        self.count += x.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics over processes: N processes on N shards == one process on all the data."""
        if world()[1] == 1 or self.sum is None:
            return
        count, self.sum, self.sq_sum = all_reduce_sum(torch.tensor([float(self.count)], dtype=torch.float64),
                                                      self.sum, self.sq_sum)
        self.count = int(count.item())
        if self.grad_rows is not None:
            self.grad_rows, self.grad_cols = all_reduce_sum(self.grad_rows, self.grad_cols)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each input feature over all tokens (Wanda's ||X_j||)."""
        return self.sq_sum.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-feature variance over tokens (FLAP's fluctuation)."""
        return (self.sq_sum / max(self.count, 1) - self.mean**2).clamp_min(0)


@dataclass
class LayerStats:
    """Statistics of one decoder layer: input stats per module, and Block Influence (ShortGPT)."""

    inputs: dict[nn.Module, InputStats] = field(default_factory=dict)
    block_influence: float = 0.0
    #: adapter-specific statistics from :meth:`ArchAdapter.calibration_hooks` (e.g. ``"router_mass"``)
    extra: dict[str, Any] = field(default_factory=dict)
    #: input Gram matrices (``layerwise_statistics(grams_of=...)``), for reconstruction; a
    #: :class:`llmprune.sparsity.HessianAccumulator` per module
    grams: dict[nn.Module, Any] = field(default_factory=dict)
