"""Expert removal by routing mass (with calibration data) or weight norm (without).

With calibration statistics an expert's importance is its *routing mass*: the routing weight the router gave it
when it was among the top-k, summed over calibration tokens and divided by their number (selection frequency x
mean routing weight when selected). Without, the L2 norm of the expert's weights (all of its batched
parameters). Registered as the ``experts`` criterion: calibration optional, not streamed.

Example::

    scores = expert_importance(adapter.experts(layer), layer_stats)   # [num_experts], higher = more important
"""

from __future__ import annotations

import torch

from ...arch.base import ExpertsSpec
from ...calibration.calibrate import LayerStats
from .units import register_unit_criterion

__all__ = ["expert_importance"]


def expert_importance(moe: ExpertsSpec, stats: LayerStats | None) -> torch.Tensor:
    """Importance of each expert of one layer (higher = more important): routing mass, else weight norm."""
    if stats is not None and "router_mass" in stats.extra:
        return stats.extra["router_mass"].double() / max(int(stats.extra.get("router_tokens", 1)), 1)
    total = torch.zeros(moe.num_experts, dtype=torch.float64)
    for p in moe.params:
        w = getattr(p.module, p.name).detach()
        total += w.double().pow(2).sum(dim=(1, 2)).cpu()
    return total.sqrt()


register_unit_criterion("experts", "routing_mass", "routing mass on the calibration tokens (selection frequency x "
                        "mean routing weight), else the L2 norm of the expert's weights", expert_importance,
                        calibration="optional", needs=("router_mass", "weights"), streams=False, default=True)
