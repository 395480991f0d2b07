"""Score every unit of every layer with the configured criterion (pure given weights and statistics).

Example::

    scores = score_layers(model, adapter, PruneConfig(heads=0.25, ffn=0.25), stats)
    scores[0].neurons          # importance of layer 0's FFN neurons (higher = more important)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import ExpertsSpec
from ..calibration.calibrate import LayerStats
from ..core.config import PruneConfig
from .criteria.base import get_criterion
from .criteria.units import get_unit_criterion

__all__ = ["LayerScores", "score_layers", "score_layer", "expert_scores"]


@dataclass
class LayerScores:
    """Importance scores of one layer's units (higher = more important)."""

    q_heads: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    expert_neurons: torch.Tensor | None = None  # [num_experts, neurons per expert]
    experts: torch.Tensor | None = None  # [num_experts]
    group_size: int = 1
    block_influence: float | None = None


def score_layers(
    model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, stats: Sequence[LayerStats] | None
) -> list[LayerScores]:
    """Per-layer unit scores with the configured criterion (pure given weights and statistics)."""
    return [score_layer(adapter, layer, cfg, stats[i] if stats is not None else None)
            for i, layer in enumerate(adapter.decoder_layers(model))]


def score_layer(adapter: ArchAdapter, layer: nn.Module, cfg: PruneConfig, stats: LayerStats | None) -> LayerScores:
    """Unit scores of one layer (used alone by the sequential reconstruction pass)."""
    criterion = get_criterion(cfg.method)
    opts = criterion.options_of(cfg)
    layer_stats = stats.inputs if stats is not None else None
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    s = LayerScores(block_influence=stats.block_influence if stats is not None else None)
    if attn is not None and cfg.heads > 0:
        s.q_heads = criterion.fn(attn.q_slots, attn.num_heads, layer_stats, **opts)
        s.kv_heads = criterion.fn(attn.kv_slots, attn.num_kv_heads, layer_stats, **opts)
        s.group_size = attn.group_size
    if ffn is not None and cfg.ffn > 0:
        s.neurons = criterion.fn(ffn.slots, ffn.num_neurons, layer_stats, **opts)
    moe = adapter.experts(layer)
    if moe is not None and cfg.ffn > 0:
        s.expert_neurons = torch.stack([criterion.fn(moe.neuron_slots(e), moe.num_neurons, layer_stats, **opts)
                                        for e in range(moe.num_experts)])
    if moe is not None and cfg.experts > 0:
        s.experts = expert_scores(moe, stats)
    return s


def expert_scores(moe: ExpertsSpec, stats: LayerStats | None) -> torch.Tensor:
    """Importance of each expert (higher = more important) by the registered ``experts`` criterion (routing mass
    with calibration statistics, weight norm without: :mod:`.criteria.routing_mass`)."""
    return get_unit_criterion("experts").fn(moe, stats)
