"""Magnitude pruning: the importance of a weight is ``|W_ij|`` (no calibration data)."""

from __future__ import annotations

import torch

from .masks import nm_mask, unstructured_mask

__all__ = ["magnitude_scores", "magnitude_mask"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32, ``[out, in]``."""
    return weight.detach().float().abs()


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                   per: str = "row") -> torch.Tensor:
    """Keep-mask of ``weight`` by magnitude: unstructured (``per`` row or layer) or N:M when ``nm=(n, m)``."""
    scores = magnitude_scores(weight)
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, per=per)
