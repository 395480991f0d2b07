"""Non-uniform allocation: how much to prune in each layer (pure functions; the structured policies that
feed them from a model are in :mod:`llmprune.structured.allocation`, OWL's in :mod:`llmprune.sparsity.owl`).

Three families of rules, each with a bounded per-layer ratio and an exact total:

- **Cost-based** (:func:`allocate_by_cost`, structured ``allocation="error"``): every layer offers a curve
  "remove ``k`` units -> remove ``p(k)`` parameters at cost ``c(k)``" (the layer's output reconstruction
  error, :func:`llmprune.structured.reconstruct.removal_error_curve`). The parameter budget goes to the cheapest
  removals overall: marginal cost per parameter on each curve's lower convex hull, greedily. Curves of
  different unit kinds (a layer's attention heads and its FFN neurons) compete for the same budget, so the
  split between heads and neurons follows the measured cost too. Raw squared errors are comparable across
  layers because whatever a layer adds to the residual stream reaches the final norm through the skip
  connections.
- **Rank-based** (:func:`allocate_global`, structured ``allocation="global"``): every unit's score divided by its
  layer's mean, the lowest removed overall.
- **Score-based** (:func:`spread_ratios`): a per-layer statistic moves each layer's ratio around the
  target, linearly, within ``±spread`` (OWL's rule, Yin et al. 2024, where the statistic is the layer's
  outlier ratio; for structured pruning it is the Block Influence of ShortGPT). Layers with a *higher*
  statistic are pruned *less*. :func:`ratios_to_counts` turns ratios into integer counts with an exact total.

Example::

    ratios = spread_ratios([0.9, 0.1, 0.2], target=0.5, spread=0.1, max_ratio=0.9)   # [0.4, 0.55, 0.55] approx.
    counts = ratios_to_counts(ratios, sizes=[768, 768, 768], total=1152, max_ratio=0.9)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import RatioError

__all__ = ["CostCurve", "allocate_by_cost", "spread_ratios", "ratios_to_counts", "allocate_global"]


@dataclass(frozen=True)
class CostCurve:
    """Options of one group of units: removing ``k`` units (``k = 0 .. len(cost) - 1``) removes
    ``k * unit_params`` parameters and costs ``cost[k]`` (``cost[0] == 0``)."""

    unit_params: int
    cost: list[float]

    @property
    def max_units(self) -> int:
        return len(self.cost) - 1


def _lower_hull(cost: list[float]) -> list[int]:
    """Indices ``k`` of the lower convex hull of the points ``(k, cost[k])`` (always contains 0 and the last)."""
    hull: list[int] = []
    for k in range(len(cost)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> k
            if (cost[b] - cost[a]) * (k - a) >= (cost[k] - cost[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def allocate_by_cost(curves: Sequence[CostCurve], budget: int) -> list[int]:
    """Units removed per curve, removing at most ``budget`` parameters at the least summed cost.

    Greedy over the segments of each curve's lower convex hull in order of marginal cost per parameter
    (optimal for convex curves at the hull's breakpoints; a segment that does not fit is taken as far as
    it fits), then single-unit steps, cheapest first, fill what is left. The result removes ``budget`` parameters exactly when the unit sizes allow it, and
    otherwise falls short by less than the smallest unit that still fits.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    counts = [0] * len(curves)
    segments = []  # (slope, curve, from_k, to_k)
    for ci, c in enumerate(curves):
        if c.max_units <= 0 or c.unit_params <= 0:
            continue
        hull = _lower_hull([float(x) for x in c.cost])
        for a, b in zip(hull, hull[1:]):
            slope = (c.cost[b] - c.cost[a]) / ((b - a) * c.unit_params)
            segments.append((slope, ci, a, b))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    left = budget
    blocked: set[int] = set()
    for _, ci, a, b in segments:
        if ci in blocked or counts[ci] != a:
            continue
        take = min(b - a, left // curves[ci].unit_params)
        counts[ci] += take
        left -= take * curves[ci].unit_params
        if take < b - a:
            blocked.add(ci)  # later segments of this curve are steeper; single steps fill below
    while left > 0:
        best, best_ci = math.inf, -1
        for ci, c in enumerate(curves):
            k = counts[ci]
            if k < c.max_units and 0 < c.unit_params <= left:
                step = (c.cost[k + 1] - c.cost[k]) / c.unit_params
                if step < best:
                    best, best_ci = step, ci
        if best_ci < 0:
            break
        counts[best_ci] += 1
        left -= curves[best_ci].unit_params
    return counts


def spread_ratios(values: Sequence[float], target: float, spread: float, max_ratio: float,
                  sizes: Sequence[int] | None = None) -> list[float]:
    """Per-layer ratios ``target - 2*spread*(v - mean(v)) / (max(v) - min(v))``, clipped to
    ``[0, max_ratio]`` and shifted so that their ``sizes``-weighted mean is exactly ``target``.

    This is OWL's rule (its ``λ`` is ``spread``): the ratios span ``2*spread`` before clipping, and a
    layer with a higher value is pruned less. Equal values give the uniform ``target``.
    """
    if not 0.0 <= target <= max_ratio <= 1.0:
        raise ValueError(f"need 0 <= target ({target}) <= max_ratio ({max_ratio}) <= 1")
    v = torch.as_tensor(list(values), dtype=torch.float64)
    w = torch.as_tensor(list(sizes) if sizes is not None else [1] * len(v), dtype=torch.float64)
    if v.numel() == 0:
        return []
    span = float(v.max() - v.min())
    z = (v - (v * w).sum() / w.sum()) / span if span > 0 else torch.zeros_like(v)
    r = target - 2 * spread * z
    # Clip and shift the free layers until the weighted mean is exact (a few passes at most).
    for _ in range(len(v) + 1):
        r = r.clamp(0.0, max_ratio)
        gap = target - float((r * w).sum() / w.sum())
        if abs(gap) < 1e-12:
            break
        free = (r < max_ratio) if gap > 0 else (r > 0)
        if not bool(free.any()):
            break
        r = torch.where(free, r + gap * w.sum() / (w * free).sum(), r)
    return [float(x) for x in r]


def ratios_to_counts(ratios: Sequence[float], sizes: Sequence[int], total: int, max_ratio: float = 1.0) -> list[int]:
    """Integer counts ``≈ ratio * size`` per layer, summing to exactly ``total``, each at most
    ``floor(max_ratio * size)`` (largest remainders get the rounding, ties by layer order)."""
    caps = [math.floor(max_ratio * s + 1e-9) for s in sizes]
    if total > sum(caps):
        raise ValueError(f"cannot remove {total} units with at most {max_ratio:g} of each layer")
    want = [min(r * s, c) for r, s, c in zip(ratios, sizes, caps)]
    counts = [min(math.floor(x + 1e-9), c) for x, c in zip(want, caps)]
    rest = total - sum(counts)
    order = sorted(range(len(want)), key=lambda i: (-(want[i] - counts[i]), i))
    while rest != 0:
        moved = False
        for i in (order if rest > 0 else reversed(order)):
            if rest > 0 and counts[i] < caps[i]:
                counts[i] += 1
                rest -= 1
                moved = True
            elif rest < 0 and counts[i] > 0:
                counts[i] -= 1
                rest += 1
                moved = True
            if rest == 0:
                break
        if not moved:
            break
    return counts


def allocate_global(
    layer_scores: Sequence[torch.Tensor], total_remove: int, min_keep: float | Sequence[float]
) -> list[int]:
    """Per-layer removal counts from globally ranked, per-layer-normalised scores.

    Scores are divided by their layer's mean (so layers of different scale compare), then the lowest
    ``total_remove`` are removed overall, keeping at least ``ceil(min_keep * n)`` (and 1) units per layer;
    ``min_keep`` is one fraction for every layer or one per layer (one-cycle's per-layer caps).
    """
    keeps = [min_keep] * len(layer_scores) if isinstance(min_keep, (int, float)) else list(min_keep)
    entries = []
    for li, s in enumerate(layer_scores):
        s = s.float()
        norm = s / s.mean().clamp_min(1e-12)
        entries += [(float(v), li, ui) for ui, v in enumerate(norm.tolist())]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    caps = [s.numel() - max(1, math.ceil(k * s.numel())) for s, k in zip(layer_scores, keeps)]
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
            f"cannot remove {total_remove} units while keeping min_keep={min(keeps):g} or more of every layer; "
            "lower the ratio or min_keep"
        )
    return counts
