"""Structured allocation: how many heads and neurons each layer loses, for every policy but ``uniform`` and
``global`` (whose counts come with the scores, :func:`llmprune.structured.select.removal_counts`). The rules are
pure functions in :mod:`llmprune.core.allocate`; this module feeds them from a model:

- ``error``: every layer's cost curves (:func:`layer_cost_curves`: the output error of removing its ``k``
  lowest units, refitted with ``reconstruct``), one parameter budget for heads and neurons (:func:`error_counts`);
- ``fisher`` (method ``obs``): the obs cost curves in loss units, each kind keeping its uniform total
  (:func:`per_kind_cost_counts`);
- ``block_influence``: ratios within ``±spread`` of the target, less where Block Influence is higher
  (:func:`block_influence_counts`).

Example::

    counts = error_counts(model, adapter, cfg, [layer_cost_curves(adapter, layer, cfg, scores, stats), ...])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from ..core.allocate import CostCurve, allocate_by_cost, ratios_to_counts, spread_ratios
from ..core.config import PruneConfig
from ..core.stats import LayerStats
from .reconstruct import removal_error_curve
from .score import LayerScores
from .select import LayerCounts, attention_units, neurons_to_remove, units_to_remove
from .unit_params import attention_unit_params as _attention_unit_params, neuron_params as _neuron_params

__all__ = ["layer_cost_curves", "error_counts", "per_kind_cost_counts", "block_influence_counts"]


def _gram(stats: LayerStats, module: nn.Module) -> torch.Tensor:
    return stats.grams[module].hessian()


def layer_cost_curves(adapter: ArchAdapter, layer: nn.Module, cfg: PruneConfig, scores: LayerScores,
                      stats: LayerStats) -> tuple[CostCurve | None, CostCurve | None]:
    """(heads, neurons) cost curves of one layer: the output error of removing its ``k`` lowest-scoring
    attention units / FFN neurons (refitted when ``cfg.reconstruct``), up to keeping ``min_keep``."""
    heads_curve = neurons_curve = None
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    if attn is not None and scores.q_heads is not None and attn.output.module in stats.grams:
        units, us = attention_units(scores.q_heads, scores.kv_heads, scores.group_size, cfg.attention_unit)
        order = torch.sort(us.float(), stable=True).indices.tolist()
        cols = torch.cat([attn.output.indices(units[u].q_heads) for u in order])
        n = len(units)
        max_units = n - max(1, math.ceil(cfg.min_keep * n))
        per_unit = cols.numel() // n
        curve = removal_error_curve(weight_matrix(attn.output.module), _gram(stats, attn.output.module), cols,
                                    max_units * per_unit, refit=cfg.reconstruct, percdamp=cfg.percdamp)
        heads_curve = CostCurve(_attention_unit_params(attn, cfg.attention_unit)[0],
                                [float(curve[k * per_unit]) for k in range(max_units + 1)])
    if ffn is not None and scores.neurons is not None and ffn.output.module in stats.grams:
        n = ffn.num_neurons
        order = torch.sort(scores.neurons.float(), stable=True).indices
        cols = ffn.output.indices(order)
        step = cfg.multiple_of
        max_units = (n - max(step, math.ceil(cfg.min_keep * n))) // step
        per = cols.numel() // n
        curve = removal_error_curve(weight_matrix(ffn.output.module), _gram(stats, ffn.output.module), cols,
                                    max_units * step * per, refit=cfg.reconstruct, percdamp=cfg.percdamp)
        neurons_curve = CostCurve(step * _neuron_params(ffn), [float(curve[k * step * per]) for k in range(max_units + 1)])
    return heads_curve, neurons_curve


def _uniform_budget(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig) -> int:
    """Parameters that ``cfg.heads`` / ``cfg.ffn`` would remove with uniform widths."""
    return sum(_uniform_budgets(model, adapter, cfg))


def _uniform_budgets(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig) -> tuple[int, int]:
    """(head, FFN neuron) parameters that ``cfg.heads`` / ``cfg.ffn`` would remove with uniform widths."""
    layers = adapter.decoder_layers(model)
    total = 0
    attns = [adapter.attention(layer) for layer in layers]
    attns = [a for a in attns if a is not None]
    if cfg.heads > 0 and attns:
        unit_params, unit_q = _attention_unit_params(attns[0], cfg.attention_unit)
        units = units_to_remove(cfg.heads, sum(a.num_heads for a in attns), unit_q, cfg.rounding)
        total += units * unit_params
    neurons = 0
    if cfg.ffn > 0:
        for layer in layers:
            ffn = adapter.ffn(layer)
            if ffn is not None:
                neurons += neurons_to_remove(cfg.ffn, ffn.num_neurons, cfg.multiple_of) * _neuron_params(ffn)
    return total, neurons


def error_counts(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig,
                 curves: Sequence[tuple[CostCurve | None, CostCurve | None]]) -> list[LayerCounts]:
    """Per-layer counts of the ``error`` allocation: the uniform setting's parameter budget, spent where
    the summed output error is lowest (heads and neurons of all layers compete)."""
    flat = [c for pair in curves for c in pair if c is not None]
    chosen = iter(allocate_by_cost(flat, _uniform_budget(model, adapter, cfg)))
    out = []
    for heads_curve, neurons_curve in curves:
        h = next(chosen) if heads_curve is not None else 0
        n = next(chosen) * cfg.multiple_of if neurons_curve is not None else 0
        out.append(LayerCounts(h, n))
    return out


def per_kind_cost_counts(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig,
                         curves: Sequence[tuple[CostCurve | None, CostCurve | None]]) -> list[LayerCounts]:
    """Per-layer counts of the ``fisher`` allocation: heads and FFN neurons each keep the uniform setting's
    total, spent where the summed cost (estimated loss increase) of that kind is lowest."""
    budgets = _uniform_budgets(model, adapter, cfg)
    picks = []
    for kind in (0, 1):
        kind_curves = [pair[kind] for pair in curves if pair[kind] is not None]
        picks.append(iter(allocate_by_cost(kind_curves, budgets[kind]) if kind_curves else []))
    return [LayerCounts(next(picks[0]) if h is not None else 0, next(picks[1]) * cfg.multiple_of if n is not None else 0)
            for h, n in curves]


def block_influence_counts(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig,
                           block_influence: Sequence[float]) -> list[LayerCounts]:
    """Per-layer counts of the ``block_influence`` allocation: each kind's total is the uniform one, and a
    layer's ratio moves within ``±spread`` of it (layers that change the residual stream more lose less)."""
    layers = adapter.decoder_layers(model)
    max_ratio = 1.0 - cfg.min_keep
    heads = [0] * len(layers)
    attn_layers = [(i, a) for i, a in enumerate(adapter.attention(layer) for layer in layers) if a is not None]
    if cfg.heads > 0 and attn_layers:
        unit_q = _attention_unit_params(attn_layers[0][1], cfg.attention_unit)[1]
        sizes = [a.num_heads // unit_q for _, a in attn_layers]
        total = units_to_remove(cfg.heads, sum(a.num_heads for _, a in attn_layers), unit_q, cfg.rounding)
        ratios = spread_ratios([block_influence[i] for i, _ in attn_layers], total / sum(sizes), cfg.spread,
                               max(max_ratio, total / sum(sizes)), sizes)
        for (i, _), c in zip(attn_layers, ratios_to_counts(ratios, sizes, total, max(max_ratio, total / sum(sizes)))):
            heads[i] = c
    neurons = [0] * len(layers)
    ffn_layers = [(i, f) for i, f in enumerate(adapter.ffn(layer) for layer in layers) if f is not None]
    if cfg.ffn > 0 and ffn_layers:
        step = cfg.multiple_of
        sizes = [f.num_neurons // step for _, f in ffn_layers]
        total = sum(neurons_to_remove(cfg.ffn, f.num_neurons, step) for _, f in ffn_layers) // step
        target = total / sum(sizes)
        ratios = spread_ratios([block_influence[i] for i, _ in ffn_layers], target, cfg.spread,
                               max(max_ratio, target), sizes)
        for (i, _), c in zip(ffn_layers, ratios_to_counts(ratios, sizes, total, max(max_ratio, target))):
            neurons[i] = c * step
    return [LayerCounts(h, n) for h, n in zip(heads, neurons)]
