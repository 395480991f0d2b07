"""``obs``: structured optimal brain surgeon, the default method. It has no per-unit score: each layer's heads and
neurons are removed greedily by the output error left *after* the optimal least-squares update of o_proj /
down_proj (ZipLM, SlimGPT; the maths in :mod:`llmprune.structured.obs`), weighed by the loss's output Fisher
with the ``fisher`` allocation. Its passes, in memory or streamed (``streams`` gives each its layer source):

1. ``fisher``: the output Fisher, one forward and one backward pass taken layer by layer
   (:func:`llmprune.calibration.fisher.output_fisher`);
2. ``price`` (allocations ``fisher`` / ``error``): every layer's greedy cost curves on the dense model, from which
   each layer's counts are chosen (:mod:`llmprune.core.allocate`);
3. ``cut``: the sequential pass, each layer chosen, cut and refitted on the outputs of the already pruned layers
   (:func:`llmprune.structured.sequential.prune_sequential`).

Example::

    plan = get_criterion("obs").run(model, adapter, config, batches, None, True, None, None)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ...core.config import PruneConfig, PrunePlan
from .base import Criterion, register_method

__all__ = ["run_obs", "fisher_batches"]


def fisher_batches(config: PruneConfig, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration batches the Fisher pass reads: the first ``fisher_samples`` windows, in whole batches."""
    return batches[:max(1, math.ceil(config.fisher_samples / config.batch_size))]


def run_obs(model: nn.Module, adapter: Any, config: PruneConfig, batches: list[torch.Tensor], device: Any,
            progress: bool, streams: Callable[[str], Any] | None = None, store: Any = None) -> PrunePlan:
    """Prune heads and FFN neurons of ``model`` in place with method ``obs``; returns the applied plan."""
    from ...calibration.calibrate import LayerIO, layerwise_statistics
    from ...calibration.fisher import output_fisher
    from ...core.allocate import CostCurve
    from ..compensate import enable_biases, zero_deltas
    from ..obs import obs_cost_curves
    from ..allocation import error_counts, per_kind_cost_counts
    from ..sequential import obs_layer, output_modules, prune_sequential
    from ...arch.surgery import prune_layer

    stream = streams or (lambda phase: None)
    layers = adapter.decoder_layers(model)
    if config.bias_compensation:  # zero biases on o_proj / down_proj (outputs unchanged), refitted with the kept
        enable_biases(adapter, model, zero_deltas(adapter, model))  # columns; raises first where none can be declared
    fisher = None
    if config.allocation == "fisher":
        fisher = output_fisher(model, adapter, fisher_batches(config, batches), diagonal=config.fisher_diagonal,
                               device=device, labels=config.fisher_labels, seed=config.seed,
                               layer_io=stream("fisher"), store=store)
    counts = None
    if config.allocation in ("fisher", "error"):
        io = stream("price") or LayerIO()

        def price(i: int, layer: nn.Module, stats: Any) -> None:
            curves = obs_cost_curves(adapter, layer, config, stats, fisher[i] if fisher is not None else None)
            io.records[i] = [None if c is None else [c.unit_params, c.cost] for c in curves]
            stats.grams.clear()

        if io.start < len(layers):
            layerwise_statistics(model, adapter, batches, device=device, progress=progress, on_layer=price,
                                 grams_of=lambda layer: output_modules(adapter, layer), rerun=False,
                                 modules_of=lambda layer: [], layer_io=io)
        curves = [tuple(None if c is None else CostCurve(c[0], c[1]) for c in io.records[i])
                  for i in range(len(layers))]
        joint = config.allocation == "error"  # one budget for heads and neurons
        counts = (error_counts if joint else per_kind_cost_counts)(model, adapter, config, curves)
    cut = stream("cut")
    for i, lp in (cut.plans.items() if cut is not None else ()):  # resumed: finished layers take their cut shapes
        prune_layer(adapter, layers[i], lp)
    return prune_sequential(model, adapter, config, batches, device=device, progress=progress, counts=counts,
                            fisher=fisher, layer_io=cut, select_layer=obs_layer)


register_method(Criterion(
    "obs", None, needs_calibration=True,
    description="structured optimal brain surgeon: greedy removal by output error after the optimal refit "
                "(ZipLM / SlimGPT), Fisher-weighted with allocation fisher; always refits",
    run=run_obs, allocations=("fisher", "error", "uniform"), default_allocation="fisher", refits=True))
