"""Wanda (Sun et al., 2023): prune by weights *and* activations.

The importance of ``W_ij`` is ``|W_ij| * ||X_j||``, where ``||X_j||`` is the L2 norm over calibration
tokens of input feature ``j`` of the layer. Weights are compared within each output row (or within each
group of ``m`` inputs for N:M), and no weight update is made.
"""

from __future__ import annotations

from functools import partial

import torch

from .masks import nm_mask, unstructured_mask
from ._common import prune_by_input_norm
from .registry import register_sparsity_method

__all__ = ["wanda_scores", "wanda_mask"]


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X||`` (broadcast over rows), float32 ``[out, in]``.

    Args:
        weight: ``[out, in]``.
        input_norm: ``[in]`` L2 norm of each input feature over the calibration tokens
            (``llmprune.calibration.calibrate.InputStats.norm``).
    """
    if input_norm.dim() != 1 or input_norm.numel() != weight.shape[1]:
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}; expected [{weight.shape[1]}]")
    return weight.detach().float().abs() * input_norm.detach().to(weight.device, torch.float32).reshape(1, -1)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None, per: str = "row") -> torch.Tensor:
    """Keep-mask of ``weight`` by Wanda scores: per output row (default) or N:M when ``nm=(n, m)``."""
    scores = wanda_scores(weight, input_norm)
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, per=per)


register_sparsity_method("wanda", "|W| * ||X||", needs="norms", prune=partial(prune_by_input_norm, wanda_mask))
