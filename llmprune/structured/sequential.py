"""Structured pruning with reconstruction, one decoder layer at a time (``PruneConfig(reconstruct=True)``),
and the layer-level inputs of the ``error`` and ``block_influence`` allocations.

:func:`prune_sequential` runs inside :func:`llmprune.calibration.calibrate.layerwise_statistics`'s ``on_layer`` hook,
so every layer is calibrated on the outputs of the layers already pruned before it:

1. score the layer's units on its current inputs (the configured criterion);
2. remove as many units as the allocation gave this layer (:func:`llmprune.structured.select.plan_layer`);
3. cut the weights (:func:`llmprune.arch.surgery.prune_layer`) and refit the kept columns of every output
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

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import set_weight_matrix, weight_matrix
from ..calibration.calibrate import LayerStats, layerwise_statistics
from ..core.config import LayerPlan, PruneConfig, PrunePlan
from ..calibration.fisher import output_modules_of
from .obs import obs_layer_scores
from .reconstruct import augment_gram, refit_columns
from .score import LayerScores, score_layer
from .select import LayerCounts, plan_layer, removal_counts
from ..arch.surgery import _complement, prune_layer, remove_layers
from .unit_params import attention_unit_params as _attention_unit_params

__all__ = ["output_modules", "prune_sequential", "obs_layer"]


def output_modules(adapter: ArchAdapter, layer: nn.Module) -> list[nn.Module]:
    """The real modules through which a layer's heads and FFN neurons enter the residual stream."""
    return output_modules_of(adapter, layer)


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
    from ..checkpoint.perlayer import set_config_widths  # local import: perlayer imports surgery

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
