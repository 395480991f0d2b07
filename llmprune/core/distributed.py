"""The running ``torch.distributed`` process group (``accelerate launch``): rank, world size, sums over processes."""

from __future__ import annotations

import torch

__all__ = ["world", "all_reduce_sum"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the running ``torch.distributed`` group (``accelerate launch``), else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise sums over processes (identity in one process); float64 kept, devices kept."""
    import torch.distributed as dist

    if world()[1] == 1:
        return list(tensors)
    out = []
    for t in tensors:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out.append(t)
    return out
