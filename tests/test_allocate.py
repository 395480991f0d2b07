"""Non-uniform allocation: bounded per-layer ratios, exact totals (pure functions and the structured pipeline)."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.core.allocate import CostCurve, allocate_by_cost, ratios_to_counts, spread_ratios
from llmprune.arch import get_adapter
from llmprune.structured.pipeline import count_parameters
from llmprune.arch.surgery import layer_widths

from tiny_models import tiny_causal_lm


def _brute_force(curves, budget):
    best = None
    for ks in itertools.product(*[range(c.max_units + 1) for c in curves]):
        used = sum(k * c.unit_params for k, c in zip(ks, curves))
        if used == budget:
            cost = sum(c.cost[k] for k, c in zip(ks, curves))
            best = cost if best is None else min(best, cost)
    return best


def test_allocate_by_cost_is_optimal_on_convex_curves():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        curves = []
        for _ in range(3):
            steps = torch.rand(5, generator=g).sort().values  # increasing marginal costs: convex
            cost = [0.0] + torch.cumsum(steps, 0).tolist()
            curves.append(CostCurve(unit_params=int(torch.randint(1, 3, (1,), generator=g)), cost=cost))
        budget = int(torch.randint(0, 12, (1,), generator=g))
        counts = allocate_by_cost(curves, budget)
        used = sum(k * c.unit_params for k, c in zip(counts, curves))
        assert used <= budget and all(0 <= k <= c.max_units for k, c in zip(counts, curves))
        best = _brute_force(curves, budget)
        if best is not None and used == budget:  # greedy is optimal up to one partly taken step
            worst_step = max(max(b - a for a, b in zip(c.cost, c.cost[1:])) for c in curves)
            assert sum(c.cost[k] for k, c in zip(counts, curves)) <= best + worst_step + 1e-9


def test_allocate_by_cost_exact_budget_and_cheapest_first():
    cheap = CostCurve(unit_params=2, cost=[0, 1, 2, 3, 4])
    dear = CostCurve(unit_params=2, cost=[0, 10, 20, 30, 40])
    assert allocate_by_cost([cheap, dear], 8) == [4, 0]
    assert allocate_by_cost([cheap, dear], 10) == [4, 1]
    # units of different sizes still meet the budget exactly when they can
    big = CostCurve(unit_params=5, cost=[0, 0.5, 1.0])
    counts = allocate_by_cost([cheap, big], 9)
    assert counts[0] * 2 + counts[1] * 5 == 9
    with pytest.raises(ValueError):
        allocate_by_cost([cheap], -1)


def test_spread_ratios_bounded_and_exact_mean():
    values = [0.9, 0.1, 0.2, 0.3]
    r = spread_ratios(values, target=0.5, spread=0.1, max_ratio=0.9)
    assert sum(r) / 4 == pytest.approx(0.5, abs=1e-12)
    assert r[0] < 0.5 < r[1]  # the layer with the highest statistic is pruned least
    assert max(r) - min(r) == pytest.approx(0.2, abs=1e-12)  # 2 * spread before clipping
    sizes = [10, 30, 30, 30]
    r = spread_ratios(values, target=0.7, spread=0.3, max_ratio=0.8, sizes=sizes)
    assert all(0 <= x <= 0.8 + 1e-12 for x in r)
    assert sum(x * s for x, s in zip(r, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)
    assert spread_ratios([1, 1, 1], 0.4, 0.1, 0.9) == pytest.approx([0.4, 0.4, 0.4])


def test_ratios_to_counts_exact_total_within_caps():
    counts = ratios_to_counts([0.33, 0.51, 0.2], sizes=[10, 10, 7], total=9, max_ratio=0.6)
    assert sum(counts) == 9 and counts[1] <= 6
    with pytest.raises(ValueError):
        ratios_to_counts([0.5, 0.5], sizes=[4, 4], total=8, max_ratio=0.5)


@pytest.mark.parametrize("reconstruct", [False, True])
def test_error_allocation_removes_the_uniform_budget(reconstruct):
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    uniform = tiny_causal_lm("llama")
    prune(uniform, PruneConfig(heads=0.5, ffn=0.25, method="wanda"), calibration=calib, progress=False)
    model = tiny_causal_lm("llama")
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="wanda", allocation="error", reconstruct=reconstruct, min_keep=0.25)
    result = prune(model, cfg, calibration=calib, progress=False)
    # a head group here is worth 2*16*64*2 + 16*64*2 = 6144 = 32 neurons of 3*64: the budget is met exactly
    assert count_parameters(model) == count_parameters(uniform)
    for w in layer_widths(model, get_adapter(model)):
        assert w["neurons"] >= 0.25 * 96 and w["kv_heads"] >= 1
    assert result.plan.layers[0].kept_neurons is not None


def test_block_influence_allocation_keeps_each_kinds_total():
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    model = tiny_causal_lm("llama")
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="wanda", allocation="block_influence", spread=0.2)
    prune(model, cfg, calibration=calib, progress=False)
    widths = layer_widths(model, get_adapter(model))
    assert sum(w["neurons"] for w in widths) == 3 * 96 - 3 * 24
    assert sum(w["heads"] for w in widths) == 3 * 4 - 3 * 2
    assert len({w["neurons"] for w in widths}) > 1  # non-uniform
