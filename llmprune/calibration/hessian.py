"""Input Gram matrices (the SparseGPT Hessian ``2/N Σ x xᵀ``) accumulated over calibration tokens."""

from __future__ import annotations

import torch

from ..core.distributed import all_reduce_sum, world

__all__ = ["HessianAccumulator"]


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
        n = x.shape[0]
        if n == 0:
            return
        total = self.count + n
        self.H.mul_(self.count / total)
        self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.count = total

    def all_reduce(self) -> None:
        """Combine the running means of all processes (``accelerate launch``) into the mean over all tokens."""
        if world()[1] == 1:
            return
        weighted, count = all_reduce_sum(self.H * self.count, torch.tensor([float(self.count)], dtype=torch.float64,
                                                                            device=self.H.device))
        self.count = int(count.item())
        self.H = weighted / max(self.count, 1)

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
