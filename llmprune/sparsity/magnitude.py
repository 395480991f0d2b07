"""Magnitude pruning: the importance of a weight is ``|W_ij|`` (no calibration data)."""

from __future__ import annotations

import torch

from .masks import nm_mask, unstructured_mask
from .registry import register_sparsity_method

__all__ = ["magnitude_scores", "magnitude_mask"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32, ``[out, in]``."""
    return weight.detach().float().abs()


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                   per: str = "row") -> torch.Tensor:
    """Keep-mask of ``weight`` by magnitude: unstructured (``per`` row or layer) or N:M when ``nm=(n, m)``."""
    scores = magnitude_scores(weight)
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, per=per)


@torch.no_grad()
def _prune(weight: torch.Tensor, stats: None, sparsity: float, config) -> None:
    """The registered ``prune``: zero the smallest ``|W|`` of ``weight`` in place (no statistics)."""
    keep = magnitude_mask(weight, sparsity, nm=config.nm, per=config.per)
    weight.mul_(keep.to(weight.device, weight.dtype))


register_sparsity_method("magnitude", "|W|, no data", needs="weights", prune=_prune)
