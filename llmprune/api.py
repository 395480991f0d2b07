"""The one-call entry point: score, select and physically remove units.

Example::

    from llmprune import PruneConfig, prune
    result = prune(model, PruneConfig(heads=0.25, ffn=0.25, method="wanda"),
                   tokenizer=tok, calibration="calib.txt")
    result.model      # the same object, now smaller
    result.plan       # kept indices per layer (saved next to the model)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .arch import ArchAdapter, get_adapter
from .arch.base import ExpertsSpec
from .compensate import add_deltas, compensation_deltas, enable_biases
from .calibrate import CalibrationError, LayerStats, as_batches, layerwise_statistics
from .config import LayerPlan, PruneConfig, PrunePlan
from .criteria import get_criterion
from .select import (
    RatioError,
    allocate_global,
    attention_units,
    keep_after_removing,
    kept_heads_from_units,
    neurons_to_remove,
    units_to_remove,
)
from .surgery import apply_plan

__all__ = ["prune", "plan_pruning", "PruneResult", "LayerScores", "score_layers", "expert_scores",
           "count_parameters"]


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


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan
    config: PruneConfig
    params_before: int
    params_after: int
    scores: list[LayerScores] = field(default_factory=list, repr=False)

    def save(self, out_dir: str | os.PathLike, tokenizer: Any = None, source: str | None = None,
             overwrite: bool = False) -> Any:
        """Save the pruned model with its recipe and plan (see :func:`llmprune.io.save_pruned`)."""
        from .io import save_pruned

        return save_pruned(self.model, out_dir, tokenizer=tokenizer, config=self.config, plan=self.plan,
                           source=source, overwrite=overwrite,
                           extra={"params_before": self.params_before, "params_after": self.params_after})


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def score_layers(
    model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, stats: Sequence[LayerStats] | None
) -> list[LayerScores]:
    """Per-layer unit scores with the configured criterion (pure given weights and statistics)."""
    criterion = get_criterion(cfg.method)
    out = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        layer_stats = stats[i].inputs if stats is not None else None
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        s = LayerScores(block_influence=stats[i].block_influence if stats is not None else None)
        if attn is not None and cfg.heads > 0:
            s.q_heads = criterion.fn(attn.q_slots, attn.num_heads, layer_stats)
            s.kv_heads = criterion.fn(attn.kv_slots, attn.num_kv_heads, layer_stats)
            s.group_size = attn.group_size
        if ffn is not None and cfg.ffn > 0:
            s.neurons = criterion.fn(ffn.slots, ffn.num_neurons, layer_stats)
        moe = adapter.experts(layer)
        if moe is not None and cfg.ffn > 0:
            s.expert_neurons = torch.stack([criterion.fn(moe.neuron_slots(e), moe.num_neurons, layer_stats)
                                            for e in range(moe.num_experts)])
        if moe is not None and cfg.experts > 0:
            s.experts = expert_scores(moe, stats[i] if stats is not None else None)
        out.append(s)
    return out


def expert_scores(moe: ExpertsSpec, stats: LayerStats | None) -> torch.Tensor:
    """Importance of each expert (higher = more important).

    With calibration statistics: the *routing mass*, i.e. the sum over calibration tokens of the routing
    weight the router gave the expert when it was among the top-k, divided by the number of tokens
    (= selection frequency x mean routing weight when selected). Without: the L2 norm of the expert's
    weights (all of its batched parameters).
    """
    if stats is not None and "router_mass" in stats.extra:
        return stats.extra["router_mass"].double() / max(int(stats.extra.get("router_tokens", 1)), 1)
    total = torch.zeros(moe.num_experts, dtype=torch.float64)
    for p in moe.params:
        w = getattr(p.module, p.name).detach()
        total += w.double().pow(2).sum(dim=(1, 2)).cpu()
    return total.sqrt()


def _check_ratios(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig) -> None:
    """Fail fast (before any calibration) on ratios the structure cannot realise."""
    layers = adapter.decoder_layers(model)
    if cfg.layers >= len(layers):
        raise RatioError(f"--layers {cfg.layers} would remove all {len(layers)} layers")
    for layer in layers:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        if cfg.heads > 0:
            if attn is None:
                raise RatioError("this model has no prunable attention heads")
            # as in select.attention_units: with one query head per KV head (MHA) both modes remove single heads
            unit = attn.group_size if cfg.attention_unit == "group" or attn.group_size == 1 else attn.num_kv_heads
            if cfg.allocation == "uniform":
                units_to_remove(cfg.heads, attn.num_heads, unit, cfg.rounding)
        moe = adapter.experts(layer)
        if cfg.ffn > 0:
            if ffn is None and moe is None:
                raise RatioError("this model has no prunable FFN neurons")
            if ffn is not None:
                neurons_to_remove(cfg.ffn, ffn.num_neurons, cfg.multiple_of)
            if moe is not None:
                neurons_to_remove(cfg.ffn, moe.num_neurons, math.lcm(cfg.multiple_of, EXPERT_WIDTH_MULTIPLE))
        if cfg.experts > 0 and moe is not None:
            experts_to_remove(cfg.experts, moe.num_experts)
    if cfg.experts > 0 and not any(adapter.experts(layer) is not None for layer in layers):
        raise RatioError("--experts: this model has no mixture-of-experts layers")


def experts_to_remove(ratio: float, num_experts: int) -> int:
    """Experts removed from a layer of ``num_experts`` for ``ratio`` (nearest whole expert, >= 1 kept)."""
    n = round(ratio * num_experts)
    if n >= num_experts:
        raise RatioError(f"--experts {ratio:g} would remove every expert ({n} of {num_experts})")
    return n


def plan_pruning(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, scores: list[LayerScores]) -> PrunePlan:
    """Turn scores into kept indices (uniform or global allocation; GQA-consistent)."""
    layers = adapter.decoder_layers(model)
    plans = [LayerPlan() for _ in layers]
    removed_layers: list[int] = []
    if cfg.layers:
        bi = torch.tensor([s.block_influence for s in scores], dtype=torch.float64)
        removed_layers = sorted(torch.sort(bi, stable=True).indices[: cfg.layers].tolist())

    if cfg.heads > 0:
        units_per_layer, unit_scores = [], []
        for s in scores:
            mode = cfg.attention_unit
            units, us = attention_units(s.q_heads, s.kv_heads, s.group_size, mode)
            units_per_layer.append(units)
            unit_scores.append(us)
        if cfg.allocation == "uniform":
            counts = [units_to_remove(cfg.heads, s.q_heads.numel(), len(u[0].q_heads), cfg.rounding)
                      for s, u in zip(scores, units_per_layer)]
        else:
            total_heads = sum(s.q_heads.numel() for s in scores)
            unit_size = len(units_per_layer[0][0].q_heads)
            total = units_to_remove(cfg.heads, total_heads, unit_size, cfg.rounding)
            counts = allocate_global(unit_scores, total, cfg.min_keep)
        for i, (s, units, us, n) in enumerate(zip(scores, units_per_layer, unit_scores, counts)):
            kept_units = keep_after_removing(us, n)
            plans[i].kept_heads, plans[i].kept_kv_heads = kept_heads_from_units(
                units, kept_units, s.q_heads.numel(), s.kv_heads.numel())

    dense = [i for i, s in enumerate(scores) if s.neurons is not None]  # MoE layers have no dense MLP
    if cfg.ffn > 0 and dense:
        neuron_scores = [scores[i].neurons for i in dense]
        if cfg.allocation == "uniform":
            counts = [neurons_to_remove(cfg.ffn, n.numel(), cfg.multiple_of) for n in neuron_scores]
        else:
            total = sum(round(cfg.ffn * n.numel()) for n in neuron_scores)
            counts = allocate_global(neuron_scores, total, cfg.min_keep)
            if cfg.multiple_of > 1:
                counts = [n.numel() - max(cfg.multiple_of, round((n.numel() - c) / cfg.multiple_of) * cfg.multiple_of)
                          for n, c in zip(neuron_scores, counts)]
        for i, n, c in zip(dense, neuron_scores, counts):
            plans[i].kept_neurons = keep_after_removing(n, c)
    _plan_experts(cfg, scores, plans)
    return PrunePlan(layers=plans, removed_layers=removed_layers)


#: kept expert widths are multiples of this: transformers' default batched-experts kernel (grouped_mm)
#: needs 16-byte aligned strides, i.e. widths that are multiples of 8 in bf16/fp16 (4 in fp32).
EXPERT_WIDTH_MULTIPLE = 8


def _plan_experts(cfg: PruneConfig, scores: list[LayerScores], plans: list[LayerPlan]) -> None:
    """Kept experts (uniform ratio per layer) and each expert's kept neurons (same count per layer)."""
    if cfg.experts > 0:
        for s, p in zip(scores, plans):
            if s.experts is not None:
                p.kept_experts = keep_after_removing(s.experts, experts_to_remove(cfg.experts, s.experts.numel()))
    moe = [(i, s.expert_neurons) for i, s in enumerate(scores) if s.expert_neurons is not None]
    if cfg.ffn <= 0 or not moe:
        return
    multiple = math.lcm(cfg.multiple_of, EXPERT_WIDTH_MULTIPLE)
    if cfg.allocation == "uniform":
        per_expert = [neurons_to_remove(cfg.ffn, n.shape[1], multiple) for _, n in moe]
    else:
        # Global: rank all expert neurons of all MoE layers (per-layer normalised), then give every expert
        # of a layer that layer's average count, since batched experts must share one width.
        flat = [n.reshape(-1) for _, n in moe]
        total = sum(round(cfg.ffn * f.numel()) for f in flat)
        counts = allocate_global(flat, total, cfg.min_keep)
        per_expert = []
        for (_, n), c in zip(moe, counts):
            num_e, width = n.shape
            kept = max(multiple, round((width - c / num_e) / multiple) * multiple)
            per_expert.append(width - min(kept, width))
    for (i, n), c in zip(moe, per_expert):
        plans[i].kept_expert_neurons = [keep_after_removing(row, c) for row in n]


def prune(
    model: nn.Module,
    config: PruneConfig,
    tokenizer: Any = None,
    calibration: str | os.PathLike | torch.Tensor | Sequence[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place according to ``config`` and return the result with its plan.

    Args:
        calibration: a text file path, a ``[n, seq_len]`` tensor of token ids, or a list of batches.
            Needed by activation-aware criteria and by layer removal.
        device: where each layer runs during calibration (the model may stay on CPU).
    """
    config.validate()
    adapter = get_adapter(model)
    criterion = get_criterion(config.method)
    _check_ratios(model, adapter, config)
    needs_data = ((criterion.needs_calibration or config.bias_compensation) and (config.heads > 0 or config.ffn > 0)) \
        or config.layers > 0
    batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
    if needs_data and batches is None:
        raise CalibrationError(
            f"method {config.method!r}{' with bias compensation' if config.bias_compensation else ''}"
            f"{' (and layer removal)' if config.layers else ''} needs calibration data: "
            "pass calibration=<text file> (CLI: --calib FILE)"
        )
    params_before = count_parameters(model)
    was_training = model.training
    model.eval()
    # Expert removal uses routing statistics whenever calibration data is given (weight norms otherwise).
    use_data = needs_data or (config.experts > 0 and batches is not None)
    stats = layerwise_statistics(model, adapter, batches, device=device, progress=progress) if use_data else None
    scores = score_layers(model, adapter, config, stats)
    plan = plan_pruning(model, adapter, config, scores)
    deltas = compensation_deltas(adapter, model, plan, stats) if config.bias_compensation and stats else []
    enable_biases(adapter, model, deltas)
    apply_plan(model, plan, adapter)
    add_deltas(deltas)
    model.train(was_training)
    return PruneResult(model, plan, config, params_before, count_parameters(model), scores)
