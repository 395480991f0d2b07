"""From importance scores to kept indices: uniform or global allocation under GQA constraints.

Attention is pruned in *attention units* so that every layer stays a valid GQA/MQA layout:

- ``group`` mode: a unit is one KV head with all the query heads that read it (removes KV cache too);
- ``query`` mode: a unit is one query head from *every* KV group (the r-th least important of each
  group), so all groups keep the same number of query heads and no KV head is removed.

All functions here are pure: tensors in, index lists out; ties are broken by index (stable sort), so
the same scores always give the same selection.

Example::

    units, scores = attention_units(q_scores, kv_scores, group_size=2, mode="group")
    kept = keep_lowest_removed(scores, n_remove=1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

__all__ = [
    "RatioError",
    "AttentionUnit",
    "attention_units",
    "units_to_remove",
    "neurons_to_remove",
    "keep_after_removing",
    "allocate_global",
    "kept_heads_from_units",
]


class RatioError(ValueError):
    """A pruning ratio cannot be realised under the model's structure."""


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


def allocate_global(
    layer_scores: Sequence[torch.Tensor], total_remove: int, min_keep: float
) -> list[int]:
    """Per-layer removal counts from globally ranked, per-layer-normalised scores.

    Scores are divided by their layer's mean (so layers of different scale compare), then the lowest
    ``total_remove`` are removed overall, keeping at least ``ceil(min_keep * n)`` (and 1) units per layer.
    """
    entries = []
    for li, s in enumerate(layer_scores):
        s = s.float()
        norm = s / s.mean().clamp_min(1e-12)
        entries += [(float(v), li, ui) for ui, v in enumerate(norm.tolist())]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    caps = [s.numel() - max(1, math.ceil(min_keep * s.numel())) for s in layer_scores]
    counts = [0] * len(layer_scores)
    removed = 0
    for _, li, _ in entries:
        if removed == total_remove:
            break
        if counts[li] < caps[li]:
            counts[li] += 1
            removed += 1
    if removed < total_remove:
        raise RatioError(
            f"cannot remove {total_remove} units while keeping min_keep={min_keep:g} of every layer; "
            "lower the ratio or min_keep"
        )
    return counts


def kept_heads_from_units(
    units: list[AttentionUnit], kept_units: list[int], num_heads: int, num_kv_heads: int
) -> tuple[list[int], list[int]]:
    """Kept query heads and KV heads (ascending) from the kept attention units."""
    removed_q = {h for i, u in enumerate(units) if i not in set(kept_units) for h in u.q_heads}
    removed_kv = {h for i, u in enumerate(units) if i not in set(kept_units) for h in u.kv_heads}
    return ([h for h in range(num_heads) if h not in removed_q], [h for h in range(num_kv_heads) if h not in removed_kv])
