"""Input Gram matrices (the SparseGPT Hessian ``2/N Σ x xᵀ``) accumulated over calibration tokens."""

from __future__ import annotations

import torch

from ..core.distributed import all_reduce_sum, world

__all__ = ["HessianAccumulator"]


def _accumulate(mat: torch.Tensor, count: int, a: torch.Tensor, b: torch.Tensor) -> int:
    """Fold ``2 aᵀb`` of new tokens (rows) into the running mean ``mat`` over ``count`` tokens, in place."""
    total = count + a.shape[0]
    mat.mul_(count / total)
    mat.addmm_(a.t(), b, alpha=2.0 / total)
    return total


def _all_reduce_mean(mat: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The running means of all processes (``accelerate launch``) combined into the mean over all tokens."""
    if world()[1] == 1:
        return mat, count
    weighted, total = all_reduce_sum(mat * count, torch.tensor([float(count)], dtype=torch.float64, device=mat.device))
    total = int(total.item())
    return weighted / max(total, 1), total


class HessianAccumulator:
    """Running ``H = 2/N * sum_t x_t x_t^T`` over all ``N`` calibration tokens of one layer's input."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or (torch.float32 if device.type == "cuda" else torch.float64)
        self.H = torch.zeros(in_features, in_features, device=device, dtype=self.dtype)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, self.dtype)
        if x.shape[0] == 0:
            return
        self.count = _accumulate(self.H, self.count, x, x)

    def all_reduce(self) -> None:
        """Combine the running means of all processes (``accelerate launch``) into the mean over all tokens."""
        self.H, self.count = _all_reduce_mean(self.H, self.count)

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("HessianAccumulator saw no inputs")
        if self.H is None:
            raise ValueError("HessianAccumulator: the Hessian was released")
        return self.H

    def release(self) -> torch.Tensor:
        """The Hessian, handed over: the accumulator drops its reference (and is spent), so a solve given
        ``overwrite_hessian=True`` works in its memory and frees it when done."""
        H = self.hessian()
        self.H = None
        return H
