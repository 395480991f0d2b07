"""Structured optimal brain surgeon (``method="obs"``): which heads and FFN neurons to remove, chosen
greedily by the output error each removal leaves *after* the optimal update of what remains (pure
functions of a weight, its input Gram matrix and, optionally, an output Fisher).

A head or a neuron enters the residual stream through a set of input columns ``B`` of one projection
(o_proj / down_proj: the adapter's ``output`` slot). With the input Gram ``G = Σ x xᵀ`` and ``Ĝ = (G + λI)^-1``,
removing ``B`` and refitting the kept columns costs (optimal brain surgeon, Hassibi & Stork 1993; its
structured, greedy form is ZipLM, Kurtic et al. 2023, and SlimGPT, Ling et al. 2024)::

    ΔE(B) = tr( F W_B (Ĝ_BB)^-1 W_Bᵀ ),     W ← W - W_B (Ĝ_BB)^-1 Ĝ_B,:,     Ĝ ← Ĝ - Ĝ_:,B (Ĝ_BB)^-1 Ĝ_B,:

``F`` weighs the output error: the identity gives the plain squared error of the layer output; the
empirical Fisher of the loss with respect to the projection's output (:mod:`llmprune.calibration.fisher`) turns it
into a second-order estimate of the increase of the *model's* loss, ``ΔL ≈ ½ tr(F ΔW G ΔWᵀ)`` (the
Kronecker-factored curvature of the LLM Surgeon, van der Ouderaa et al. 2024). Costs in loss units are
comparable across layers and unit kinds, which is what the ``fisher`` allocation
(:func:`obs_cost_curves`) needs.

Greedy: every step removes the cheapest unit given the removals so far. Single columns (FFN neurons) are
removed in chunks of ``1/chunk_div`` of the remaining ones (their joint update is exact; the chunk is
chosen by the individual costs, as in SlimGPT's batched greedy). Query heads under GQA go one from every
KV group per step, so every group keeps the same number.

Example::

    order, cost = greedy_column_removal(down.weight, gram, n_remove=384, fisher=f_down)
    steps, cost = greedy_block_removal(o.weight, gram, head_columns, n_steps=1, groups=[[0, 1, 2], [3, 4, 5]])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .reconstruct import damped_cholesky

__all__ = ["greedy_column_removal", "greedy_block_removal", "head_blocks", "obs_layer_scores", "obs_cost_curves"]

_DT = torch.float64


def _damped_inverse(gram: torch.Tensor, percdamp: float) -> torch.Tensor:
    g = gram.to(_DT, copy=True)  # one private float64 copy, damped in place and freed before the inverse
    mean = float(torch.diagonal(g).mean()) if g.numel() else 0.0
    lam = percdamp * mean if mean > 0 else max(percdamp, 1e-8)
    chol = damped_cholesky(g, lam, who="obs", overwrite=True)
    del g
    return torch.cholesky_inverse(chol)


def _fisher_times(fisher: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """``F @ w`` for a full ``[out, out]`` Fisher, a diagonal ``[out]`` one, or the identity (``None``)."""
    if fisher is None:
        return w.clone()
    f = fisher.to(w.device, _DT)
    return f.reshape(-1, 1) * w if f.dim() == 1 else f @ w


@torch.no_grad()
def greedy_column_removal(weight: torch.Tensor, gram: torch.Tensor, n_remove: int, fisher: torch.Tensor | None = None,
                          percdamp: float = 0.01, chunk_div: int = 32) -> tuple[list[int], torch.Tensor]:
    """Greedy removal of ``n_remove`` single input columns of ``weight`` ``[out, in]``.

    Returns the removal order and the cumulative cost ``[n_remove + 1]`` (float64, starting at 0; inside a
    chunk its exact joint cost is shared in proportion to the members' individual costs).
    """
    w = weight.detach().to(gram.device, _DT).clone()
    n = w.shape[1]
    n_remove = max(0, min(int(n_remove), n - 1))
    ginv = _damped_inverse(gram, percdamp)
    fw = _fisher_times(fisher, w)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    inf = torch.tensor(float("inf"), dtype=_DT, device=w.device)
    order: list[int] = []
    cost = [0.0]
    while len(order) < n_remove:
        own = torch.where(alive, (w * fw).sum(0) / torch.diagonal(ginv), inf)
        s = max(1, min(n_remove - len(order), int(alive.sum()) // max(chunk_div, 1)))
        idx = torch.topk(own, s, largest=False).indices.sort().values
        g_bb = ginv.index_select(0, idx).index_select(1, idx)
        update = torch.linalg.solve(g_bb, ginv.index_select(0, idx))  # (Ĝ_BB)^-1 Ĝ_B,:   [s, n]
        joint = float(torch.trace(torch.linalg.solve(g_bb, w[:, idx].t() @ fw[:, idx])))
        parts = own[idx].clamp_min(0)
        share = parts / parts.sum() if float(parts.sum()) > 0 else torch.full_like(parts, 1.0 / s)
        total = cost[-1]
        for j, frac in zip(idx.tolist(), share.tolist()):
            total += joint * frac
            order.append(j)
            cost.append(total)
        fw.addmm_(fw[:, idx], update, alpha=-1.0)
        w.addmm_(w[:, idx], update, alpha=-1.0)
        ginv.addmm_(ginv[:, idx], update, alpha=-1.0)
        alive[idx] = False
        ginv[idx, idx] = 1.0  # removed: keeps the diagonal finite, masked by ``alive``
    return order, torch.tensor(cost, dtype=_DT)


@torch.no_grad()
def greedy_block_removal(weight: torch.Tensor, gram: torch.Tensor, blocks: Sequence[torch.Tensor], n_steps: int,
                         groups: Sequence[Sequence[int]] | None = None, fisher: torch.Tensor | None = None,
                         percdamp: float = 0.01) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy removal of column blocks (heads): ``n_steps`` steps, each removing the cheapest block or, with
    ``groups`` (block ids per KV group), the cheapest block of every group at once.

    Returns the blocks removed at each step and the cumulative cost ``[n_steps + 1]``.
    """
    w = weight.detach().to(gram.device, _DT).clone()
    ginv = _damped_inverse(gram, percdamp)
    fw = _fisher_times(fisher, w)
    alive = set(range(len(blocks)))
    blocks = [torch.as_tensor(b, dtype=torch.long, device=w.device) for b in blocks]

    def price(cols: torch.Tensor) -> float:
        g_bb = ginv.index_select(0, cols).index_select(1, cols)
        return float(torch.trace(torch.linalg.solve(g_bb, w[:, cols].t() @ fw[:, cols])))

    steps: list[list[int]] = []
    cost = [0.0]
    for _ in range(n_steps):
        if groups is None:
            pick = [min(sorted(alive), key=lambda b: price(blocks[b]))]
        else:
            pick = [min((b for b in g if b in alive), key=lambda b: price(blocks[b])) for g in groups]
        cols = torch.cat([blocks[b] for b in pick])
        g_bb = ginv.index_select(0, cols).index_select(1, cols)
        cost.append(cost[-1] + float(torch.trace(torch.linalg.solve(g_bb, w[:, cols].t() @ fw[:, cols]))))
        update = torch.linalg.solve(g_bb, ginv.index_select(0, cols))
        fw.addmm_(fw[:, cols], update, alpha=-1.0)
        w.addmm_(w[:, cols], update, alpha=-1.0)
        ginv.addmm_(ginv[:, cols], update, alpha=-1.0)
        ginv[cols, cols] = 1.0
        alive -= set(pick)
        steps.append(pick)
    return steps, torch.tensor(cost, dtype=_DT)


def head_blocks(attn, mode: str) -> tuple[list[torch.Tensor], list[list[int]] | None]:
    """Output-projection column blocks of one layer's attention units and, in ``query`` mode, the blocks of
    each KV group. ``group`` mode (or MHA): one block per KV group; ``query``: one block per query head."""
    heads = [attn.output.indices([h]) for h in range(attn.num_heads)]
    gs = attn.group_size
    if mode == "group" or gs == 1:
        return [torch.cat(heads[g * gs:(g + 1) * gs]) for g in range(attn.num_kv_heads)], None
    return heads, [list(range(g * gs, (g + 1) * gs)) for g in range(attn.num_kv_heads)]


def _head_steps(attn, weight: torch.Tensor, gram: torch.Tensor, n_steps: int, mode: str, fisher, percdamp: float):
    blocks, groups = head_blocks(attn, mode)
    return greedy_block_removal(weight, gram, blocks, n_steps, groups, fisher, percdamp)


def _neuron_columns(ffn, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """The down projection's columns of every neuron, in neuron order, and their block of its input Gram."""
    from ..arch.base import weight_matrix

    module = ffn.output.module
    cols = ffn.output.indices(torch.arange(ffn.num_neurons))
    w = weight_matrix(module).detach()[:, cols.to(weight_matrix(module).device)]
    g = stats.grams[module].hessian()
    cols = cols.to(g.device)
    if torch.equal(cols, torch.arange(g.shape[0], device=g.device)):  # the usual layout: no [n, n] copy
        return w, g
    return w, g[cols.unsqueeze(1), cols]


def obs_layer_scores(adapter, layer: nn.Module, cfg, stats, counts, fisher: dict | None = None):
    """:class:`~llmprune.structured.score.LayerScores` of one layer whose ``counts`` lowest units are exactly the greedy
    OBS choice on the layer's current input Gram matrices (``stats.grams``): a unit's score is the step at
    which it was removed, units that stay score higher. :func:`llmprune.structured.select.plan_layer` then keeps the rest
    under the GQA constraints unchanged."""
    from ..arch.base import weight_matrix
    from .score import LayerScores

    fisher = fisher or {}
    s = LayerScores(block_influence=stats.block_influence)
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    if attn is not None and cfg.heads > 0:
        module = attn.output.module
        s.group_size = attn.group_size
        q = torch.full((attn.num_heads,), 1e6, dtype=_DT) + torch.arange(attn.num_heads, dtype=_DT)
        kv = torch.zeros(attn.num_kv_heads, dtype=_DT)
        if counts.attention_units > 0:
            steps, _ = _head_steps(attn, weight_matrix(module), stats.grams[module].hessian(), counts.attention_units,
                                   cfg.attention_unit, fisher.get(module), cfg.percdamp)
            grouped = cfg.attention_unit == "group" or attn.group_size == 1
            kv_rank = torch.full((attn.num_kv_heads,), 1e6, dtype=_DT) + torch.arange(attn.num_kv_heads, dtype=_DT)
            for r, pick in enumerate(steps):
                for b in pick:
                    if grouped:
                        kv_rank[b] = r
                    else:
                        q[b] = r
            if grouped:
                q, kv = torch.zeros(attn.num_heads, dtype=_DT), kv_rank
        s.q_heads, s.kv_heads = q, kv
    if ffn is not None and cfg.ffn > 0:
        module = ffn.output.module
        scores = torch.full((ffn.num_neurons,), 1e9, dtype=_DT) + torch.arange(ffn.num_neurons, dtype=_DT)
        if counts.neurons > 0:
            w, g = _neuron_columns(ffn, stats)
            order, _ = greedy_column_removal(w, g, counts.neurons, fisher.get(module), cfg.percdamp)
            for r, j in enumerate(order):
                scores[j] = r
        s.neurons = scores
    return s


def _cap(ratio: float) -> float:
    """The largest fraction of a layer's units a curve prices: a layer rarely loses more than twice the average
    (pricing all of them would cost as much as pruning the layer ten times)."""
    return min(1.0, 2 * ratio + 0.1)


def obs_cost_curves(adapter, layer: nn.Module, cfg, stats, fisher: dict | None = None):
    """(heads, neurons) :class:`~llmprune.core.allocate.CostCurve` of one layer: the greedy OBS cost of removing
    ``k`` attention units / ``k * multiple_of`` neurons, up to keeping ``min_keep`` (the ``fisher``
    allocation; in loss units when ``fisher`` is given)."""
    from ..core.allocate import CostCurve
    from ..arch.base import weight_matrix
    from .unit_params import attention_unit_params as _attention_unit_params, neuron_params as _neuron_params

    fisher = fisher or {}
    heads_curve = neurons_curve = None
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    if attn is not None and cfg.heads > 0 and attn.output.module in stats.grams:
        module = attn.output.module
        unit_params, unit_q = _attention_unit_params(attn, cfg.attention_unit)
        n_units = attn.num_heads // unit_q
        max_units = min(n_units - max(1, math.ceil(cfg.min_keep * n_units)), math.ceil(_cap(cfg.heads) * n_units))
        _, cost = _head_steps(attn, weight_matrix(module), stats.grams[module].hessian(), max_units,
                              cfg.attention_unit, fisher.get(module), cfg.percdamp)
        heads_curve = CostCurve(unit_params, cost.tolist())
    if ffn is not None and cfg.ffn > 0 and ffn.output.module in stats.grams:
        module = ffn.output.module
        n, step = ffn.num_neurons, cfg.multiple_of
        max_units = min((n - max(step, math.ceil(cfg.min_keep * n))) // step, math.ceil(_cap(cfg.ffn) * n / step))
        w, g = _neuron_columns(ffn, stats)
        _, cost = greedy_column_removal(w, g, max_units * step, fisher.get(module), cfg.percdamp)
        neurons_curve = CostCurve(step * _neuron_params(ffn), cost[::step].tolist())
    return heads_curve, neurons_curve
