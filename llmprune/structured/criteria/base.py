"""Criterion registry and helpers shared by the pure scoring functions.

A criterion maps the slots of one unit kind (all heads of a layer, all neurons of a layer, ...) to one
importance score per unit. Higher means more important; the lowest-scoring units are removed.

Example::

    score = get_criterion("wanda")
    s = score.fn(ffn.slots, ffn.num_neurons, stats.inputs)   # tensor [num_neurons]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ...arch.base import Slot, weight_matrix
from ...calibration.calibrate import InputStats

__all__ = ["Criterion", "register_criterion", "register_method", "SCORE_ALLOCATIONS", "get_criterion", "available_criteria", "final_refits", "slot_weights", "slot_input_feature"]

#: ``(slots, n_units, stats, **options) -> scores [n_units]``
ScoreFn = Callable[..., torch.Tensor]


#: the allocations a per-unit score supports (a method that selects inside the sequential pass declares its own)
SCORE_ALLOCATIONS = ("uniform", "global", "error", "block_influence")


@dataclass(frozen=True)
class Criterion:
    """One structured method, registered once: what it needs and how it runs.

    Attributes:
        fn: the per-unit score (higher = more important), or ``None`` for a method that chooses units itself.
        needs_calibration: it reads calibration statistics.
        prepare: ``(model, adapter, batches, progress) -> list[LayerStats]``: a whole-model pass the criterion
            needs before scoring (gradients, per-label readouts); its statistics are merged into the layer-wise
            ones, and such criteria are scored once on the dense model (they cannot be re-taken layer by layer).
        run: a method that chooses each layer's units inside the sequential pass (``obs``):
            ``run(model, adapter, config, batches, device, progress, streams, store) -> PrunePlan``, where
            ``streams(phase)`` gives each pass its :class:`~llmprune.calibration.calibrate.LayerIO` (``None`` in
            memory) and ``store`` keeps what outlives a layer (the Fisher pass).
        allocations: the allocations it supports; ``default_allocation`` is used when the config names none.
        streams: whether a streamed run (one layer in memory) can run it.
        options: the :class:`~llmprune.core.config.PruneConfig` fields the method reads beyond the ratios (e.g.
            ``single_unit_score``): passed by name to ``prepare`` and ``fn`` (:meth:`options_of`).
        refits: it refits the projections that consume the removed units (least squares) whatever the config
            says, as ``reconstruct=True`` does for the scores; ``--params`` then measures its candidates with a
            stand-in that refits too (:func:`final_refits`).
    """

    name: str
    fn: ScoreFn | None
    needs_calibration: bool
    description: str
    prepare: Callable | None = None
    run: Callable | None = None
    allocations: tuple[str, ...] = SCORE_ALLOCATIONS
    default_allocation: str = "uniform"
    streams: bool = True
    options: tuple[str, ...] = ()
    refits: bool = False

    def options_of(self, config: Any) -> dict[str, Any]:
        """The keyword arguments ``prepare`` and ``fn`` get from ``config`` (its :attr:`options`)."""
        return {name: getattr(config, name) for name in self.options}


_CRITERIA: dict[str, Criterion] = {}


def register_method(criterion: Criterion) -> Criterion:
    """Register a structured method (one call per method, in its own module)."""
    if criterion.name in _CRITERIA:
        raise ValueError(f"method {criterion.name!r} is already registered")
    if criterion.default_allocation not in criterion.allocations:
        raise ValueError(f"method {criterion.name!r}: default allocation {criterion.default_allocation!r} is not "
                         "one of its allocations")
    _CRITERIA[criterion.name] = criterion
    return criterion


def register_criterion(name: str, needs_calibration: bool, description: str,
                       prepare: Callable | None = None, options: tuple[str, ...] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Register a per-unit score function as a method (decorator); ``options``: the config fields it reads
    (:attr:`Criterion.options`)."""
    def wrap(fn: ScoreFn) -> ScoreFn:
        # a criterion with its own whole-model pass (gradients) cannot be computed one layer at a time
        register_method(Criterion(name, fn, needs_calibration, description, prepare, streams=prepare is None,
                                  options=tuple(options)))
        return fn

    return wrap


def get_criterion(name: str) -> Criterion:
    if name not in _CRITERIA:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available_criteria())}")
    return _CRITERIA[name]


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def final_refits(config: Any) -> bool:
    """Whether a run with ``config`` refits what consumes the removed heads / neurons: its method always does
    (``Criterion.refits``), or ``config.reconstruct`` asks for it.

    Example::

        final_refits(PruneConfig(heads=0.25))                                    # True: obs refits
        final_refits(PruneConfig(heads=0.25, method="wanda"))                    # False
    """
    return bool(get_criterion(config.method).refits or config.reconstruct)


def slot_weights(slot: Slot, n_units: int) -> torch.Tensor:
    """The slot's weights per unit as ``[n_units, width, other_dim]`` (float32, detached)."""
    w = weight_matrix(slot.module).detach().float()
    idx = slot.indices(torch.arange(n_units)).to(w.device)
    if slot.dim == "out":
        return w.index_select(0, idx).reshape(n_units, slot.width, -1)
    return w.index_select(1, idx).t().reshape(n_units, slot.width, -1)


def slot_input_feature(slot: Slot, n_units: int, values: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-feature vector (e.g. ||X_j||) to ``slot_weights``' shape."""
    values = values.float()
    if slot.dim == "out":
        return values.reshape(1, 1, -1)  # rows read every input feature
    idx = slot.indices(torch.arange(n_units))
    return values.index_select(0, idx.to(values.device)).reshape(n_units, slot.width, 1)
