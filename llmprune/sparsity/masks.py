"""Weight masks from importance scores (pure functions; ``True`` = keep).

Scores are ``[out_features, in_features]`` (the ``nn.Linear.weight`` layout); higher = more important.
Counts are exact and ties are broken deterministically: among equal scores the weight with the lower
flat index is pruned first (a stable sort), so the same scores always give the same mask.

Example::

    keep = unstructured_mask(w.abs(), 0.5)            # exactly half of every row kept
    keep = nm_mask(w.abs() * x_norm, n=2, m=4)        # 2:4 along the input dimension
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["num_pruned", "unstructured_mask", "nm_mask", "parse_pattern", "check_nm", "mask_sparsity"]


def num_pruned(n: int, sparsity: float) -> int:
    """Number of weights pruned out of ``n`` at ``sparsity`` (round half up, so 0.5 * odd n prunes more)."""
    _check_sparsity(sparsity)
    return min(n, int(math.floor(float(sparsity) * n + 0.5)))


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be a fraction in [0, 1)")


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest entries of each row of a 2-D tensor (stable: lower index first)."""
    prune = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        prune.scatter_(-1, order, True)
    return prune


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: Literal["row", "layer"] = "row") -> torch.Tensor:
    """Keep-mask pruning exactly ``num_pruned(...)`` lowest-scoring weights per output row or per matrix.

    ``per="row"`` compares weights within each output row (Wanda's choice, which works better for LLMs
    than a layer-wide threshold); ``per="layer"`` compares all weights of the matrix.
    """
    _check_sparsity(sparsity)
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [out, in] matrix, got shape {tuple(scores.shape)}")
    s = scores.detach().float()
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    if per == "row":
        return ~_lowest(s, num_pruned(s.shape[1], sparsity))
    if per == "layer":
        return ~_lowest(s.reshape(1, -1), num_pruned(s.numel(), sparsity)).reshape(s.shape)
    raise ValueError(f"per={per!r}; choose 'row' or 'layer'")


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    """Validate an N:M pattern (``n`` kept of every ``m``) for a matrix with ``in_features`` columns."""
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 0 < n <= m:
        raise ValueError(f"invalid N:M pattern {n}:{m}: need integers 0 < n <= m")
    if in_features is not None and in_features % m:
        raise ValueError(
            f"{n}:{m} sparsity needs in_features divisible by {m}, but in_features={in_features} "
            f"(remainder {in_features % m}); exclude this layer from the targets or use unstructured sparsity"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` kept weights in every group of ``m`` consecutive input features."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [out, in] matrix, got shape {tuple(scores.shape)}")
    check_nm(n, m, scores.shape[1])
    s = scores.detach().float()
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    rows, cols = s.shape
    groups = s.reshape(rows, cols // m, m)
    return ~_lowest(groups, m - n).reshape(rows, cols)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> ``None``; ``"2:4"`` -> ``(2, 4)`` (n kept of every m)."""
    if pattern == "unstructured":
        return None
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (AttributeError, ValueError):
        raise ValueError(f"pattern={pattern!r}; use 'unstructured' or 'N:M' such as '2:4' or '4:8'") from None
    check_nm(n, m)
    return n, m


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned (False) entries of a keep-mask."""
    return 1.0 - float(mask.float().mean()) if mask.numel() else 0.0
