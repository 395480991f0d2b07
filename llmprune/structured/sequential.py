"""Structured pruning with reconstruction, one decoder layer at a time (``PruneConfig(reconstruct=True)``),
and the layer-level inputs of the ``error`` and ``block_influence`` allocations.

:func:`prune_sequential` runs inside :func:`llmprune.calibration.calibrate.layerwise_statistics`'s ``on_layer`` hook,
so every layer is calibrated on the outputs of the layers already pruned before it:

1. score the layer's units on its current inputs (the configured criterion);
2. remove as many units as the allocation gave this layer (:func:`llmprune.structured.select.plan_layer`);
3. cut the weights (:func:`llmprune.structured.surgery.prune_layer`) and refit the kept columns of every output
   projection (the adapter's ``output`` slots: o_proj / down_proj and their per-family equivalents) from
   the projection's input Gram matrix (:func:`llmprune.structured.reconstruct.refit_columns`); an existing bias is
   refitted with them;
4. the pruned layer's output feeds the next layer.

Covered: every family's attention output and dense FFN output (Llama/Mistral/Qwen/Gemma, Phi-3, GPT-2
``Conv1D``, GPT-NeoX, Falcon, OPT, BERT, and the attention and dense layers of Qwen3-MoE / Mixtral).
Not covered: neurons inside batched experts (their per-expert inputs have no module hook); those are
cut without refit.

Example::

    plan = prune_sequential(model, adapter, PruneConfig(heads=0.25, ffn=0.25, reconstruct=True), batches)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.allocate import CostCurve, allocate_by_cost, ratios_to_counts, spread_ratios
from ..arch import ArchAdapter
from ..arch.base import set_weight_matrix, weight_matrix
from ..calibration.calibrate import LayerStats, layerwise_statistics
from ..core.config import LayerPlan, PruneConfig, PrunePlan
from ..calibration.fisher import output_modules_of
from .obs import obs_layer_scores
from .reconstruct import augment_gram, refit_columns, removal_error_curve
from .score import LayerScores, score_layer
from .select import LayerCounts, attention_units, neurons_to_remove, plan_layer, removal_counts, units_to_remove
from .surgery import _complement, prune_layer, remove_layers

__all__ = ["output_modules", "prune_sequential", "obs_layer", "layer_cost_curves", "error_counts", "per_kind_cost_counts",
           "block_influence_counts"]


def output_modules(adapter: ArchAdapter, layer: nn.Module) -> list[nn.Module]:
    """The real modules through which a layer's heads and FFN neurons enter the residual stream."""
    return output_modules_of(adapter, layer)


from .unit_params import attention_unit_params as _attention_unit_params, neuron_params as _neuron_params


# ---- error allocation --------------------------------------------------------------------------------
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


# ---- the sequential pass -----------------------------------------------------------------------------
def _counts_from_plan(adapter: ArchAdapter, layer: nn.Module, cfg: PruneConfig, lp: LayerPlan) -> LayerCounts:
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    units = 0
    if attn is not None and lp.kept_heads is not None:
        units = (attn.num_heads - len(lp.kept_heads)) // _attention_unit_params(attn, cfg.attention_unit)[1]
    neurons = ffn.num_neurons - len(lp.kept_neurons) if ffn is not None and lp.kept_neurons is not None else 0
    return LayerCounts(units, neurons)


def _shape_scores(adapter: ArchAdapter, layer: nn.Module, cfg: PruneConfig) -> LayerScores:
    """Scores of the right shapes only: what the uniform counts of :func:`removal_counts` read."""
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    s = LayerScores()
    if attn is not None and cfg.heads > 0:
        s.q_heads, s.kv_heads, s.group_size = torch.zeros(attn.num_heads), torch.zeros(attn.num_kv_heads), attn.group_size
    if ffn is not None and cfg.ffn > 0:
        s.neurons = torch.zeros(ffn.num_neurons)
    return s


def _cut_and_refit(adapter: ArchAdapter, layer: nn.Module, lp: LayerPlan, stats: LayerStats, percdamp: float) -> None:
    jobs = [(m, weight_matrix(m).detach().clone(), kept) for m, kept in _refit_jobs(adapter, layer, lp)]
    prune_layer(adapter, layer, lp)
    for module, original, kept in jobs:
        _refit(module, original, kept.to(original.device), stats, percdamp)


def obs_layer(adapter: ArchAdapter, layer: nn.Module, cfg: PruneConfig, stats: LayerStats, counts: LayerCounts,
              fisher: dict | None) -> LayerPlan:
    """Method ``obs`` on one layer: heads first (greedy on o_proj's Gram, cut, refit), then the FFN neurons on
    the down projection's Gram *re-gathered with the attention already cut* (its inputs changed)."""
    import dataclasses

    lp = LayerPlan()
    attn = adapter.attention(layer)
    if attn is not None and cfg.heads > 0:
        heads_only = dataclasses.replace(cfg, ffn=0.0)
        c = LayerCounts(counts.attention_units, 0)
        lp_h = plan_layer(obs_layer_scores(adapter, layer, heads_only, stats, c, fisher), heads_only, c)
        if counts.attention_units > 0:
            _cut_and_refit(adapter, layer, lp_h, stats, cfg.percdamp)
        lp.kept_heads, lp.kept_kv_heads = lp_h.kept_heads, lp_h.kept_kv_heads
    ffn = adapter.ffn(layer)
    cut_heads = attn is not None and cfg.heads > 0 and counts.attention_units > 0
    if ffn is not None and cfg.ffn > 0 and counts.neurons > 0 and cut_heads and "regram" in stats.extra:
        stats.extra["regram"](ffn.output.module)  # the attention changed, so the FFN's inputs did
    if ffn is not None and cfg.ffn > 0:
        ffn_only = dataclasses.replace(cfg, heads=0.0)
        c = LayerCounts(0, counts.neurons)
        lp_n = plan_layer(obs_layer_scores(adapter, layer, ffn_only, stats, c, fisher), ffn_only, c)
        if counts.neurons > 0:
            _cut_and_refit(adapter, layer, lp_n, stats, cfg.percdamp)
        lp.kept_neurons = lp_n.kept_neurons
    return lp


def _refit_jobs(adapter: ArchAdapter, layer: nn.Module, lp: LayerPlan) -> list[tuple[nn.Module, torch.Tensor]]:
    """(output module, kept input columns in original numbering) for every output projection that loses columns."""
    jobs = []
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    for spec, kept, n in ((attn, lp.kept_heads, attn.num_heads if attn else 0),
                          (ffn, lp.kept_neurons, ffn.num_neurons if ffn else 0)):
        if spec is None or kept is None or len(kept) == n or not isinstance(spec.output.module, nn.Module):
            continue
        module = spec.output.module
        width = weight_matrix(module).shape[1]
        drop = torch.zeros(width, dtype=torch.bool)
        drop[spec.output.indices(_complement(kept, n))] = True
        jobs.append((module, (~drop).nonzero().reshape(-1)))
    return jobs


@torch.no_grad()
def _refit(module: nn.Module, original: torch.Tensor, kept: torch.Tensor, stats: LayerStats, percdamp: float) -> None:
    """Replace the (already sliced) ``module``'s weight, and bias if any, by the least-squares refit."""
    acc = stats.grams[module]
    gram = acc.hessian()
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        # bias = weight of a constant input 1: augment the Gram with Σx and N (HessianAccumulator's scale 2/N)
        inp = stats.inputs[module]
        scale = 2.0 / max(acc.count, 1)
        gram = augment_gram(gram, inp.sum * scale, 2.0)
        full = torch.cat([original, bias.detach().reshape(-1, 1).to(original)], dim=1)
        cols = torch.cat([kept, torch.tensor([original.shape[1]])])
        new = refit_columns(full, gram, cols, percdamp)
        set_weight_matrix(module, new[:, :-1].to(module.weight.device))
        module.bias = nn.Parameter(new[:, -1].contiguous().to(bias.device, bias.dtype), requires_grad=bias.requires_grad)
    else:
        set_weight_matrix(module, refit_columns(original, gram, kept, percdamp).to(module.weight.device))


def prune_sequential(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, batches: list[torch.Tensor],
                     plan: PrunePlan | None = None, device: Any = None, progress: bool = True,
                     fixed_scores: list[LayerScores] | None = None, layer_io: Any = None,
                     counts: Sequence[LayerCounts] | None = None,
                     fisher: Sequence[dict] | None = None, select_layer: Callable | None = None) -> PrunePlan:
    """Prune and reconstruct layer by layer, in place; returns the plan that was applied (original layer
    indices). ``model.config`` describes the new widths afterwards, as after :func:`~llmprune.structured.apply.apply_plan`.

    ``plan`` (from a first, dense calibration pass) fixes how many units each layer loses, which layers
    are removed and the expert choices; the kept heads and neurons are chosen again here on the
    sequential inputs. Without ``plan`` every layer loses the uniform counts of ``cfg``. ``fixed_scores``
    (per original layer) are used instead of re-scoring: gradient criteria (``taylor``) are scored once, on
    the dense model, since their gradients cannot be taken one layer at a time.
    Layers removed by the plan are dropped first, so the stream skips them as the pruned model will.
    ``layer_io`` (:class:`llmprune.calibration.calibrate.LayerIO`, streaming) sees each layer's plan in its ``plans``
    dict before the layer is cut; on resume, its ``plans`` already hold the finished layers'.
    ``select_layer`` (:func:`obs_layer`, method ``obs``) chooses, cuts and refits each layer itself from its current
    Gram matrices, with per-layer ``counts`` (``fisher`` / ``error`` allocation; per original layer) or the uniform
    ones, and output errors weighed by ``fisher`` (per original layer).
    """
    from .perlayer import set_config_widths  # local import: perlayer imports surgery

    n_layers = len(adapter.decoder_layers(model))
    removed = list(plan.removed_layers) if plan is not None else []
    kept_layers = [i for i in range(n_layers) if i not in set(removed)]
    remove_layers(model, adapter, removed)
    final = PrunePlan(layers=[LayerPlan() for _ in range(n_layers)], removed_layers=removed)
    for i, lp in (getattr(layer_io, "plans", None) or {}).items():  # resumed: layers already finished
        final.layers[i] = lp

    def on_layer(j: int, layer: nn.Module, stats: LayerStats) -> None:
        i = kept_layers[j]
        if select_layer is not None:
            n = counts[i] if counts is not None else removal_counts(cfg, [_shape_scores(adapter, layer, cfg)])[0]
            final.layers[i] = select_layer(adapter, layer, cfg, stats, n, fisher[i] if fisher is not None else None)
            if layer_io is not None:
                layer_io.plans[i] = final.layers[i]
            stats.grams.clear()
            return
        scores = fixed_scores[i] if fixed_scores is not None else score_layer(adapter, layer, cfg, stats)
        n = (_counts_from_plan(adapter, layer, cfg, plan.layers[i]) if plan is not None
             else removal_counts(cfg, [scores])[0])
        lp = plan_layer(scores, cfg, n)
        if plan is not None:
            lp.kept_experts = plan.layers[i].kept_experts
            lp.kept_expert_neurons = plan.layers[i].kept_expert_neurons
        if layer_io is not None:
            layer_io.plans[i] = lp
        jobs = [(m, weight_matrix(m).detach().clone(), kept) for m, kept in _refit_jobs(adapter, layer, lp)]
        prune_layer(adapter, layer, lp)
        for module, original, kept in jobs:
            _refit(module, original, kept.to(original.device), stats, cfg.percdamp)
        stats.grams.clear()  # one layer's Gram matrices at a time
        final.layers[i] = lp

    layerwise_statistics(model, adapter, batches, device=device, progress=progress, on_layer=on_layer,
                         grams_of=lambda layer: output_modules(adapter, layer), layer_io=layer_io)
    set_config_widths(model, adapter)
    return final
