"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play").

A weight matters relative to the other weights it competes with in *both* its row and its column, and
in proportion to (a power of) its input's activation norm:

    RIA_ij = (|W_ij| / Σ_k |W_kj|  +  |W_ij| / Σ_k |W_ik|) * ||X_j||^a,     a = 0.5 (the paper's choice)

Compared with Wanda (``|W_ij| * ||X_j||``) the relative terms stop whole rows or columns from being
emptied, and the square root tempers the activation outliers. Mask only, no weight update; compared per
output row (or per N:M group), like Wanda.

Example::

    keep = ria_mask(layer.weight, stats.norm, sparsity=0.5)
"""

from __future__ import annotations

from functools import partial

import torch

from .masks import nm_mask, unstructured_mask
from ._common import prune_by_input_norm
from .registry import register_sparsity_method

__all__ = ["ria_scores", "ria_mask"]


def ria_scores(weight: torch.Tensor, input_norm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA score of every weight, float32 ``[out, in]``; ``input_norm`` is ``[in]`` (``InputStats.norm``)."""
    if input_norm.dim() != 1 or input_norm.numel() != weight.shape[1]:
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}; expected [{weight.shape[1]}]")
    a = weight.detach().float().abs()
    relative = a / a.sum(0, keepdim=True).clamp_min(1e-12) + a / a.sum(1, keepdim=True).clamp_min(1e-12)
    return relative * input_norm.detach().to(a.device, torch.float32).pow(alpha).reshape(1, -1)


def ria_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
             per: str = "row", alpha: float = 0.5) -> torch.Tensor:
    """Keep-mask of ``weight`` by RIA scores: per output row (default), per layer, or N:M when ``nm=(n, m)``."""
    scores = ria_scores(weight, input_norm, alpha)
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, per=per)


register_sparsity_method("ria", "relative importance |W| over its row and column sums, times ||X||^0.5",
                         needs="norms", prune=partial(prune_by_input_norm, ria_mask))
