"""Layer removal by Block Influence (ShortGPT, Men et al. 2024): the layers that change their input least go.

A layer's Block Influence is ``1 - cos(input, output)`` averaged over the calibration tokens (gathered by the
layer-wise calibration pass). Registered as the ``layers`` criterion: it needs calibration and does not stream.

Example::

    removed = remove_lowest_influence([0.3, 0.02, 0.1, 0.5], n_remove=1)   # [1]
"""

from __future__ import annotations

from typing import Sequence

import torch

from .units import register_unit_criterion

__all__ = ["remove_lowest_influence"]


def remove_lowest_influence(block_influence: Sequence[float], n_remove: int) -> list[int]:
    """The ``n_remove`` layers of lowest Block Influence (ascending; ties: the lower index goes)."""
    bi = torch.tensor(list(block_influence), dtype=torch.float64)
    return sorted(torch.sort(bi, stable=True).indices[:n_remove].tolist())


register_unit_criterion("layers", "block_influence", "Block Influence (ShortGPT): the layers whose output differs "
                        "least from their input go", remove_lowest_influence, calibration="required",
                        needs=("block_influence",), streams=False, default=True)
