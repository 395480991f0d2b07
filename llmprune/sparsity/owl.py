"""OWL, Outlier-Weighed Layerwise sparsity (Yin et al., ICML 2024): non-uniform per-layer sparsity.

Layers with more activation *outliers* are pruned less. A layer's outlier ratio is the fraction of its
weights whose Wanda score ``|W_ij| * ||X_j||`` exceeds ``threshold`` times the mean score of their
matrix (the paper's ``M``, 5 by default); decoder blocks are ranked by it and their sparsities spread
linearly within ``±spread`` of the target (the paper's ``λ``, 0.08), with the parameter-weighted mean
equal to the target exactly (:func:`llmprune.core.allocate.spread_ratios`). Every matrix of a block gets the
block's sparsity and is then pruned by the chosen method (Wanda in the paper; any unstructured method here).

Registered as the ``owl`` allocation (:func:`~llmprune.sparsity.registry.register_sparsity_allocation`): it reads
per-input-feature norms of the dense model (one calibration pass before any layer is pruned), supports no N:M
pattern, and is not streamed (it needs every layer's outliers before the first layer is pruned).

Example::

    ratios = owl_ratios([outlier_ratio(scores_of_block_i) for i in ...], target=0.7, sizes=block_sizes)
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..arch.base import weight_matrix
from ..core.allocate import spread_ratios
from .registry import register_sparsity_allocation
from .wanda import wanda_scores

__all__ = ["outlier_ratio", "owl_ratios", "owl_layer_ratios", "DEFAULT_THRESHOLD", "DEFAULT_SPREAD"]

#: the paper's defaults for LLaMA (M = 5, λ = 0.08)
DEFAULT_THRESHOLD = 5.0
DEFAULT_SPREAD = 0.08


def outlier_ratio(weights: Sequence[torch.Tensor], input_norms: Sequence[torch.Tensor],
                  threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction of a block's weights whose Wanda score exceeds ``threshold`` x its matrix's mean score."""
    outliers, total = 0, 0
    for w, norm in zip(weights, input_norms):
        s = wanda_scores(w, norm)
        outliers += int((s > threshold * s.mean()).sum())
        total += s.numel()
    return outliers / max(total, 1)


def owl_ratios(outlier_ratios: Sequence[float], target: float, sizes: Sequence[int],
               spread: float = DEFAULT_SPREAD, max_ratio: float = 0.99) -> list[float]:
    """Per-block sparsities: more outliers, less sparsity; weighted mean exactly ``target``."""
    return spread_ratios(outlier_ratios, target, spread, max(max_ratio, target), sizes)


def owl_layer_ratios(model, adapter, targets, batches, config, device) -> list[float]:
    """OWL: per-block sparsity from the blocks' outlier ratios on the dense model's activations."""
    from ..calibration.calibrate import layerwise_statistics

    mods = {id(layer): [m for _, m in group] for layer, group in zip(adapter.decoder_layers(model), targets)}
    stats = layerwise_statistics(model, adapter, batches, modules_of=lambda layer: mods[id(layer)],
                                 device=device, progress=False)
    ratios, sizes = [], []
    for group, st in zip(targets, stats):
        ws = [weight_matrix(m) for _, m in group]
        ratios.append(outlier_ratio(ws, [st.inputs[m].norm for _, m in group], config.outlier_threshold)
                      if group else 0.0)
        sizes.append(sum(w.numel() for w in ws))
    return owl_ratios(ratios, config.sparsity, sizes, config.spread)


register_sparsity_allocation(
    "owl", "per-block sparsity from the block's activation outliers (within +-spread, exact mean; unstructured "
    "only; Yin et al. 2024)", needs="norms", layer_ratios=owl_layer_ratios, nm=False, streams=False)
