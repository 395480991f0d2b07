"""From importance scores to kept indices: uniform or global allocation under GQA constraints.

The per-layer counts of the other allocations (``error``, ``block_influence``) come from
:mod:`llmprune.core.allocate` and are applied with the same :func:`plan_layer`.

Attention is pruned in *attention units* so that every layer stays a valid GQA/MQA layout:

- ``group`` mode: a unit is one KV head with all the query heads that read it (removes KV cache too);
- ``query`` mode: a unit is one query head from *every* KV group (the r-th least important of each
  group), so all groups keep the same number of query heads and no KV head is removed.

All functions here are pure: scores in, index lists (and a :class:`PrunePlan`) out; ties are broken by index (stable sort), so
the same scores always give the same selection.

Example::

    units, scores = attention_units(q_scores, kv_scores, group_size=2, mode="group")
    kept = keep_lowest_removed(scores, n_remove=1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from torch import nn

from ..core.allocate import allocate_global
from ..core.config import LayerPlan, PruneConfig, PrunePlan, RatioError

if TYPE_CHECKING:  # only for annotations: score imports the criteria, which select must not need
    from ..arch import ArchAdapter
    from .score import LayerScores

__all__ = [
    "AttentionUnit",
    "attention_units",
    "units_to_remove",
    "neurons_to_remove",
    "keep_after_removing",
    "kept_heads_from_units",
    "check_ratios",
    "resolve_attention_unit",
    "resolve_config",
    "experts_to_remove",
    "plan_pruning",
    "plan_layer",
    "removal_counts",
    "LayerCounts",
    "EXPERT_WIDTH_MULTIPLE",
]


@dataclass(frozen=True)
class AttentionUnit:
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]


def attention_units(
    q_scores: torch.Tensor, kv_scores: torch.Tensor, group_size: int, mode: Literal["group", "query"]
) -> tuple[list[AttentionUnit], torch.Tensor]:
    """Candidate attention units of one layer and their scores (sum of member scores)."""
    num_kv = kv_scores.numel()
    if mode == "group" or group_size == 1:
        units = [AttentionUnit(tuple(range(g * group_size, (g + 1) * group_size)), (g,)) for g in range(num_kv)]
        scores = q_scores.reshape(num_kv, group_size).sum(1) + kv_scores
        return units, scores
    # query mode: rank heads inside each group; unit r = the r-th weakest head of every group.
    per_group = q_scores.reshape(num_kv, group_size)
    order = torch.sort(per_group, dim=1, stable=True).indices  # [num_kv, group_size]
    units, scores = [], []
    for r in range(group_size):
        heads = tuple(sorted(int(g * group_size + order[g, r]) for g in range(num_kv)))
        units.append(AttentionUnit(heads, ()))
        scores.append(float(per_group.gather(1, order[:, r : r + 1]).sum()))
    return units, torch.tensor(scores)


def units_to_remove(
    ratio: float, num_heads: int, unit_size: int, rounding: str, what: str = "heads"
) -> int:
    """How many attention units remove ``ratio`` of ``num_heads`` heads, or a clear :class:`RatioError`."""
    exact = ratio * num_heads / unit_size
    if rounding == "error":
        if not math.isclose(exact, round(exact), abs_tol=1e-9):
            valid = ", ".join(f"{k * unit_size / num_heads:g}" for k in range(1, num_heads // unit_size))
            raise RatioError(
                f"--{what} {ratio:g} removes {ratio * num_heads:g} of {num_heads} heads, but heads can only be removed "
                f"{unit_size} at a time here (whole GQA groups, or one head from every KV group in 'query' mode). "
                f"Valid ratios: {valid or 'none'}; or choose rounding 'down', 'up' or 'nearest'."
            )
        n = round(exact)
    elif rounding == "down":
        n = math.floor(exact + 1e-9)
    elif rounding == "up":
        n = math.ceil(exact - 1e-9)
    else:
        n = math.floor(exact + 0.5)
    total_units = num_heads // unit_size
    if n >= total_units:
        raise RatioError(f"--{what} {ratio:g} would remove every attention head ({n} of {total_units} units)")
    return n


def neurons_to_remove(ratio: float, num_neurons: int, multiple_of: int = 1) -> int:
    """Neurons removed for ``ratio``; the kept width is rounded to the nearest multiple of ``multiple_of``."""
    kept = num_neurons - round(ratio * num_neurons)
    if multiple_of > 1:
        kept = max(multiple_of, int(round(kept / multiple_of)) * multiple_of)
        kept = min(kept, num_neurons)
    if kept < 1:
        raise RatioError(f"--ffn {ratio:g} would remove every FFN neuron")
    return num_neurons - kept


def keep_after_removing(scores: torch.Tensor, n_remove: int) -> list[int]:
    """Indices kept (ascending) after removing the ``n_remove`` lowest scores (ties: lower index goes)."""
    if n_remove <= 0:
        return list(range(scores.numel()))
    order = torch.sort(scores.float(), stable=True).indices
    removed = set(order[:n_remove].tolist())
    return [i for i in range(scores.numel()) if i not in removed]


def kept_heads_from_units(
    units: list[AttentionUnit], kept_units: list[int], num_heads: int, num_kv_heads: int
) -> tuple[list[int], list[int]]:
    """Kept query heads and KV heads (ascending) from the kept attention units."""
    removed_q = {h for i, u in enumerate(units) if i not in set(kept_units) for h in u.q_heads}
    removed_kv = {h for i, u in enumerate(units) if i not in set(kept_units) for h in u.kv_heads}
    return ([h for h in range(num_heads) if h not in removed_q], [h for h in range(num_kv_heads) if h not in removed_kv])


def resolve_attention_unit(heads_ratio: float, num_heads: int, num_kv_heads: int) -> Literal["group", "query"]:
    """The concrete attention unit that ``attention_unit="auto"`` means for a model with ``num_heads`` query
    and ``num_kv_heads`` KV heads per layer, pruned by ``heads_ratio``: the unit whose nearest whole count
    comes closest to the requested ratio. A tie goes to ``query`` with at most 4 KV heads (MQA and 2-4
    groups: a whole group is a large share of the KV cache and of what attention can still see), to
    ``group`` above (whole groups also shrink the KV cache). MHA gives ``group`` (both remove single heads);
    MQA always ``query`` (its one group cannot go).

    Examples: 9 query / 3 KV heads at 0.25 -> ``query`` (both remove 3 heads); 8 / 4 at 0.25 -> ``group``
    (2 heads, where ``query`` could only remove 4); 32 / 8 at 0.25 -> ``group``; 4 / 1 -> ``query``.
    """
    if num_kv_heads == num_heads:
        return "group"
    if num_kv_heads == 1:
        return "query"
    gs = num_heads // num_kv_heads

    def miss(unit: int) -> float:
        whole = min(max(round(heads_ratio * num_heads / unit), 0), num_heads // unit - 1)
        return abs(whole * unit / num_heads - heads_ratio)

    group, query = miss(gs), miss(num_kv_heads)
    if abs(group - query) <= 1e-9:
        return "query" if num_kv_heads <= 4 else "group"
    return "group" if group < query else "query"


def resolve_config(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig) -> PruneConfig:
    """``cfg`` itself, or a copy with the choices left to the model and the method made concrete:
    ``attention_unit="auto"`` (:func:`resolve_attention_unit`, from the first attention layer of ``model``) and
    ``allocation=None`` (the method's own default); called once per model before any work, so results and saved
    recipes name what ran. Refuses an allocation the method does not support, and an unknown ``hidden_method``
    (the registered hidden-channel criteria: :mod:`.criteria.units`)."""
    import dataclasses

    # the registries alone, at call time (the methods import this module; importing them registers every method)
    from .criteria.base import get_criterion
    from .criteria.units import get_unit_criterion

    get_unit_criterion("hidden", cfg.hidden_method)
    method = get_criterion(cfg.method)
    if cfg.allocation is None:
        cfg = dataclasses.replace(cfg, allocation=method.default_allocation)
    elif cfg.allocation not in method.allocations:
        raise ValueError(f"method {cfg.method!r} supports allocation {', '.join(method.allocations)}, not "
                         f"{cfg.allocation!r}")
    if cfg.attention_unit != "auto":
        return cfg
    attn = next((a for a in map(adapter.attention, adapter.decoder_layers(model)) if a is not None), None)
    unit = "group" if attn is None else resolve_attention_unit(cfg.heads, attn.num_heads, attn.num_kv_heads)
    return dataclasses.replace(cfg, attention_unit=unit)


def _nothing_removed(flag: str, ratio: float, what: str, smallest: float, how: str,
                     other_unit: str | None = None) -> RatioError:
    via = f" (with {other_unit} units, which --attention-unit auto picks there)" if other_unit else ""
    return RatioError(f"--{flag} {ratio:g} would remove no {what}: {how}, so the smallest ratio that removes "
                      f"exactly one is {smallest:.3g}{via}; raise --{flag} (or pass 0 to leave them alone)")


def _smallest_head_ratio(adapter: ArchAdapter, layers: list[nn.Module], unit_name: str,
                         current: float) -> tuple[float, str | None]:
    """The smallest ``--heads`` that removes a unit, over both attention units (a ratio too small for query units
    may still remove a KV group, and ``auto`` would pick it): the ratio and the other unit when it is smaller."""
    attn = next((a for a in map(adapter.attention, layers) if a is not None), None)
    if attn is None or attn.group_size == 1:
        return current, None
    other = "query" if unit_name == "group" else "group"
    size = attn.group_size if other == "group" else attn.num_kv_heads
    alternative = size / attn.num_heads
    return (alternative, other) if alternative < current - 1e-12 else (current, None)


def check_ratios(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig) -> None:
    """Fail fast (before any calibration) on ratios the structure cannot realise, and on a non-zero ratio
    that would remove nothing at all (rounded to zero units in every layer)."""
    if cfg.attention_unit == "auto" or cfg.allocation is None:
        cfg = resolve_config(model, adapter, cfg)
    _check_hidden(model, adapter, cfg)
    layers = adapter.decoder_layers(model)
    if cfg.layers >= len(layers):
        raise RatioError(f"--layers {cfg.layers} would remove all {len(layers)} layers")
    uniform = cfg.allocation == "uniform"
    head_units = neurons = experts = 0
    attns, ffn_sizes, moe_sizes = [], [], []
    for layer in layers:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        if cfg.heads > 0:
            if attn is None:
                raise RatioError("this model has no prunable attention heads")
            # as in select.attention_units: with one query head per KV head (MHA) both modes remove single heads
            unit = attn.group_size if cfg.attention_unit == "group" or attn.group_size == 1 else attn.num_kv_heads
            attns.append((attn.num_heads, unit))
            if uniform:
                head_units += units_to_remove(cfg.heads, attn.num_heads, unit, cfg.rounding)
        moe = adapter.experts(layer)
        if cfg.ffn > 0:
            if ffn is None and moe is None:
                raise RatioError("this model has no prunable FFN neurons")
            if ffn is not None:
                ffn_sizes.append(ffn.num_neurons)
                neurons += (round(cfg.ffn * ffn.num_neurons) if cfg.allocation == "global" else
                            neurons_to_remove(cfg.ffn, ffn.num_neurons, cfg.multiple_of))
            if moe is not None:
                moe_sizes.append(moe.num_neurons)
                neurons += neurons_to_remove(cfg.ffn, moe.num_neurons, math.lcm(cfg.multiple_of, EXPERT_WIDTH_MULTIPLE))
        if cfg.experts > 0 and moe is not None:
            experts += experts_to_remove(cfg.experts, moe.num_experts)
    if cfg.experts > 0 and not any(adapter.experts(layer) is not None for layer in layers):
        raise RatioError("--experts: this model has no mixture-of-experts layers")
    if cfg.heads > 0 and attns:
        num_heads, unit = min(attns)
        if not uniform:  # the non-uniform allocations share one model-wide count of units (first layer's unit)
            total, unit = sum(n for n, _ in attns), attns[0][1]
            head_units = units_to_remove(cfg.heads, total, unit, cfg.rounding)
            num_heads, how = total, f"the model's {total} heads go {unit} at a time"
        else:
            how = f"{num_heads} heads per layer go {unit} at a time"
        if head_units == 0:
            smallest, other = (_smallest_head_ratio(adapter, layers, cfg.attention_unit, unit / num_heads)
                               if uniform else (unit / num_heads, None))
            raise _nothing_removed("heads", cfg.heads, "attention head", smallest,
                                   f"{how} ({cfg.attention_unit} units) and --rounding {cfg.rounding} rounds "
                                   f"{cfg.heads * num_heads / unit:.2g} units to 0", other)
    if cfg.ffn > 0 and neurons == 0 and (ffn_sizes or moe_sizes):
        if ffn_sizes:
            size, step = min(ffn_sizes), cfg.multiple_of
        else:
            size, step = min(moe_sizes), math.lcm(cfg.multiple_of, EXPERT_WIDTH_MULTIPLE)
        kept = "" if step == 1 else f" kept in multiples of {step}"
        raise _nothing_removed("ffn", cfg.ffn, "FFN neuron", step / size,
                               f"{cfg.ffn:g} of {size} neurons per layer{kept} rounds to 0")
    if cfg.experts > 0 and experts == 0:
        n = min(moe.num_experts for moe in map(adapter.experts, layers) if moe is not None)
        raise _nothing_removed("experts", cfg.experts, "expert", 1 / n,
                               f"{cfg.experts:g} of {n} experts per layer rounds to 0")


def _check_hidden(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig) -> None:
    """``hidden``: the family must allow it, and the ratio must remove at least one channel and keep one."""
    if not cfg.hidden:
        return
    if adapter.hidden_refusal:
        raise RatioError(f"--hidden: {adapter.family or type(adapter).__name__} cannot have its hidden size pruned: "
                         f"{adapter.hidden_refusal}. Prune heads / FFN neurons / layers instead")
    hidden = int(model.config.hidden_size)
    n = round(cfg.hidden * hidden)
    if n == 0:
        raise _nothing_removed("hidden", cfg.hidden, "hidden channel", 1 / hidden,
                               f"{cfg.hidden:g} of {hidden} channels rounds to 0")
    if n >= hidden:
        raise RatioError(f"--hidden {cfg.hidden:g} would remove every hidden channel ({n} of {hidden})")


def experts_to_remove(ratio: float, num_experts: int) -> int:
    """Experts removed from a layer of ``num_experts`` for ``ratio`` (nearest whole expert, >= 1 kept)."""
    n = round(ratio * num_experts)
    if n >= num_experts:
        raise RatioError(f"--experts {ratio:g} would remove every expert ({n} of {num_experts})")
    return n


@dataclass(frozen=True)
class LayerCounts:
    """How many units one layer loses: attention units (whole KV groups in ``group`` mode, one query
    head of every KV group in ``query`` mode) and FFN neurons (dense MLP only)."""

    attention_units: int = 0
    neurons: int = 0


def removal_counts(cfg: PruneConfig, scores: list[LayerScores], keep_heads: Sequence[float] | None = None,
                   keep_neurons: Sequence[float] | None = None) -> list[LayerCounts]:
    """Per-layer removal counts of the ``uniform`` and ``global`` allocations (``error`` and
    ``block_influence`` counts come from :mod:`llmprune.core.allocate`). ``keep_heads`` / ``keep_neurons``: per-layer
    smallest kept fractions (one per layer that has heads / a dense FFN) replacing ``cfg.min_keep`` in the
    global allocation (one-cycle's per-layer caps)."""
    head_counts = [0] * len(scores)
    heads = [i for i, s in enumerate(scores) if s.q_heads is not None]
    if cfg.heads > 0 and heads:
        unit_scores = [attention_units(scores[i].q_heads, scores[i].kv_heads, scores[i].group_size,
                                       cfg.attention_unit) for i in heads]
        unit_sizes = [len(units[0].q_heads) for units, _ in unit_scores]
        if cfg.allocation == "global":
            total = units_to_remove(cfg.heads, sum(scores[i].q_heads.numel() for i in heads), unit_sizes[0], cfg.rounding)
            per = allocate_global([us for _, us in unit_scores], total, keep_heads or cfg.min_keep)
        else:
            per = [units_to_remove(cfg.heads, scores[i].q_heads.numel(), size, cfg.rounding)
                   for i, size in zip(heads, unit_sizes)]
        for i, n in zip(heads, per):
            head_counts[i] = n
    neuron_counts = [0] * len(scores)
    dense = [i for i, s in enumerate(scores) if s.neurons is not None]  # MoE layers have no dense MLP
    if cfg.ffn > 0 and dense:
        neuron_scores = [scores[i].neurons for i in dense]
        if cfg.allocation == "global":
            total = sum(round(cfg.ffn * n.numel()) for n in neuron_scores)
            per = allocate_global(neuron_scores, total, keep_neurons or cfg.min_keep)
            if cfg.multiple_of > 1:
                per = [n.numel() - max(cfg.multiple_of, round((n.numel() - c) / cfg.multiple_of) * cfg.multiple_of)
                       for n, c in zip(neuron_scores, per)]
        else:
            per = [neurons_to_remove(cfg.ffn, n.numel(), cfg.multiple_of) for n in neuron_scores]
        for i, n in zip(dense, per):
            neuron_counts[i] = n
    return [LayerCounts(h, n) for h, n in zip(head_counts, neuron_counts)]


def plan_layer(s: LayerScores, cfg: PruneConfig, counts: LayerCounts) -> LayerPlan:
    """Kept heads and neurons of one layer: its ``counts`` lowest-scoring units go (GQA-consistent)."""
    plan = LayerPlan()
    if cfg.heads > 0 and s.q_heads is not None:
        units, us = attention_units(s.q_heads, s.kv_heads, s.group_size, cfg.attention_unit)
        kept_units = keep_after_removing(us, counts.attention_units)
        plan.kept_heads, plan.kept_kv_heads = kept_heads_from_units(units, kept_units, s.q_heads.numel(),
                                                                    s.kv_heads.numel())
    if cfg.ffn > 0 and s.neurons is not None:
        plan.kept_neurons = keep_after_removing(s.neurons, counts.neurons)
    return plan


def plan_pruning(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, scores: list[LayerScores],
                 counts: list[LayerCounts] | None = None) -> PrunePlan:
    """Turn scores into kept indices (GQA-consistent); ``counts`` (one per layer) override the
    allocation's own (uniform or global) counts."""
    removed_layers: list[int] = []
    if cfg.layers:  # the registered layer criterion (Block Influence: :mod:`.criteria.block_influence`)
        from .criteria.units import get_unit_criterion

        removed_layers = get_unit_criterion("layers").fn([s.block_influence for s in scores], cfg.layers)
    counts = counts if counts is not None else removal_counts(cfg, scores)
    plans = [plan_layer(s, cfg, c) for s, c in zip(scores, counts)]
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
    if cfg.allocation != "global":  # expert widths are uniform under the error / block_influence allocations
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
