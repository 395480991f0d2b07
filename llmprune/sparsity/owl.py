"""OWL, Outlier-Weighed Layerwise sparsity (Yin et al., ICML 2024): non-uniform per-layer sparsity.

Layers with more activation *outliers* are pruned less. A layer's outlier ratio is the fraction of its
weights whose Wanda score ``|W_ij| * ||X_j||`` exceeds ``threshold`` times the mean score of their
matrix (the paper's ``M``, 5 by default); decoder blocks are ranked by it and their sparsities spread
linearly within ``±spread`` of the target (the paper's ``λ``, 0.08), with the parameter-weighted mean
equal to the target exactly (:func:`llmprune.core.allocate.spread_ratios`). Every matrix of a block gets the
block's sparsity and is then pruned by the chosen method (Wanda in the paper; any unstructured method here).

Example::

    ratios = owl_ratios([outlier_ratio(scores_of_block_i) for i in ...], target=0.7, sizes=block_sizes)
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.allocate import spread_ratios
from .wanda import wanda_scores

__all__ = ["outlier_ratio", "owl_ratios", "DEFAULT_THRESHOLD", "DEFAULT_SPREAD"]

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
