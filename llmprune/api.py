"""The one-call entry point: score, select and physically remove units.

Example::

    from llmprune import PruneConfig, prune
    result = prune(model, PruneConfig(heads=0.25, ffn=0.25, method="wanda"),
                   tokenizer=tok, calibration="calib.txt")
    result.model      # the same object, now smaller
    result.plan       # kept indices per layer (saved next to the model)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .arch import ArchAdapter, get_adapter
from .calibrate import CalibrationError, LayerStats, calibration_batches, layerwise_statistics, read_calibration_text
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

__all__ = ["prune", "plan_pruning", "PruneResult", "LayerScores", "score_layers", "count_parameters"]


@dataclass
class LayerScores:
    """Importance scores of one layer's units (higher = more important)."""

    q_heads: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
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


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _as_batches(calibration: Any, tokenizer: Any, cfg: PruneConfig) -> list[torch.Tensor] | None:
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        if tokenizer is None:
            raise CalibrationError("calibration from text needs the model's tokenizer (tokenizer=...)")
        text = read_calibration_text(calibration)
        return calibration_batches(tokenizer, text, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.batch_size)
    if isinstance(calibration, torch.Tensor):
        return list(calibration.split(cfg.batch_size))
    batches = list(calibration)
    if not batches:
        raise CalibrationError("calibration data is empty")
    return batches


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
        out.append(s)
    return out


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
        if cfg.ffn > 0:
            if ffn is None:
                raise RatioError("this model has no prunable FFN neurons")
            neurons_to_remove(cfg.ffn, ffn.num_neurons, cfg.multiple_of)


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

    if cfg.ffn > 0:
        neuron_scores = [s.neurons for s in scores]
        if cfg.allocation == "uniform":
            counts = [neurons_to_remove(cfg.ffn, n.numel(), cfg.multiple_of) for n in neuron_scores]
        else:
            total = sum(round(cfg.ffn * n.numel()) for n in neuron_scores)
            counts = allocate_global(neuron_scores, total, cfg.min_keep)
            if cfg.multiple_of > 1:
                counts = [n.numel() - max(cfg.multiple_of, round((n.numel() - c) / cfg.multiple_of) * cfg.multiple_of)
                          for n, c in zip(neuron_scores, counts)]
        for i, (n, c) in enumerate(zip(neuron_scores, counts)):
            plans[i].kept_neurons = keep_after_removing(n, c)
    return PrunePlan(layers=plans, removed_layers=removed_layers)


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
    needs_data = (criterion.needs_calibration and (config.heads > 0 or config.ffn > 0)) or config.layers > 0
    batches = _as_batches(calibration, tokenizer, config)
    if needs_data and batches is None:
        raise CalibrationError(
            f"method {config.method!r}{' (and layer removal)' if config.layers else ''} needs calibration data: "
            "pass calibration=<text file> (CLI: --calib FILE)"
        )
    params_before = count_parameters(model)
    was_training = model.training
    model.eval()
    stats = layerwise_statistics(model, adapter, batches, device=device, progress=progress) if needs_data else None
    scores = score_layers(model, adapter, config, stats)
    plan = plan_pruning(model, adapter, config, scores)
    apply_plan(model, plan, adapter)
    model.train(was_training)
    return PruneResult(model, plan, config, params_before, count_parameters(model), scores)
