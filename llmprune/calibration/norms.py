"""Statistics of every norm over the hidden channels, for pruning the hidden dimension.

One forward pass per calibration batch with a hook on each norm gathers, per norm:

- ``abs_sum``: the sum over tokens of ``|y|`` per channel (``y`` the norm's output; Minitron's importance);
- a fixed sample of tokens' squared inputs ``x²`` and squared outputs ``y²``, which the ``rms`` criterion needs
  to see how each token's RMS changes when channels go (a per-token quantity no per-channel sum captures).

The whole model runs (not layer by layer): the norms of every layer are read in the same pass, and the hidden
axis is pruned only in memory. Under ``accelerate launch`` the sums are added across processes; the token
samples stay per process (each process's own windows).

Example::

    stats = norm_statistics(model, norms, batches, sample_tokens=256)
    stats[0].abs_sum / stats[0].count      # mean |activation| of each channel after the first norm
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..core.distributed import all_reduce_sum
from ..core.progress import progress_bar

__all__ = ["NormStats", "norm_statistics", "norm_eps"]


@dataclass
class NormStats:
    """What one norm saw on the calibration tokens (float64 sums; float32 token samples)."""

    eps: float
    abs_sum: torch.Tensor
    count: int = 0
    x2: list[torch.Tensor] = field(default_factory=list)  # [tokens, hidden] chunks of the sampled inputs²
    y2: list[torch.Tensor] = field(default_factory=list)  # ... and outputs²

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x², y²)`` of the sampled tokens, ``[tokens, hidden]`` each."""
        return torch.cat(self.x2), torch.cat(self.y2)


def norm_eps(norm: nn.Module) -> float:
    """The epsilon a norm adds to its variance (the attribute name differs between families)."""
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1e-6


@torch.no_grad()
def norm_statistics(model: nn.Module, norms: Sequence[nn.Module], batches: Sequence[torch.Tensor],
                    sample_tokens: int = 0, seed: int = 0, progress: bool = True) -> list[NormStats]:
    """Run ``model`` on ``batches`` and return one :class:`NormStats` per norm in ``norms``.

    ``sample_tokens``: how many tokens (spread evenly over the batches, chosen at random) keep their
    squared inputs and outputs; 0 keeps none (Minitron needs only the sums).
    """
    stats = [NormStats(norm_eps(n), torch.zeros(n.weight.shape[0], dtype=torch.float64)) for n in norms]
    per_batch = -(-sample_tokens // max(1, len(batches))) if sample_tokens else 0
    g = torch.Generator().manual_seed(seed)
    picked: dict[str, torch.Tensor | None] = {"idx": None}

    def hook(i: int):
        def on_norm(module: nn.Module, args: Any, out: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            y = (out[0] if isinstance(out, tuple) else out).reshape(-1, x.shape[-1])
            s = stats[i]
            s.abs_sum += y.abs().sum(0, dtype=torch.float64).cpu()
            s.count += y.shape[0]
            if picked["idx"] is not None:
                idx = picked["idx"].to(x.device)
                s.x2.append(x[idx].float().pow(2).cpu())
                s.y2.append(y[idx].float().pow(2).cpu())
        return on_norm

    handles = [n.register_forward_hook(hook(i)) for i, n in enumerate(norms)]
    device = next(model.parameters()).device
    try:
        for batch in progress_bar(batches, desc="hidden channels", disable=not progress):
            tokens = batch.numel()
            picked["idx"] = (torch.randperm(tokens, generator=g)[:per_batch].sort().values if per_batch else None)
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for s in stats:
        (s.abs_sum,) = all_reduce_sum(s.abs_sum)
        (count,) = all_reduce_sum(torch.tensor(float(s.count), dtype=torch.float64))
        s.count = int(count)
    return stats
