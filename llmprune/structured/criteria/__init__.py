"""Importance criteria, one file each, registered by name (pure functions of weights and statistics).

Heads and neurons: :class:`~.base.Criterion` (``PruneConfig.method``). Hidden channels, layers, experts and
vocabulary rows: :class:`~.units.UnitCriterion`, one registry per kind (:mod:`.units`); the hidden-channel criteria
register in :mod:`llmprune.structured.hidden` and the vocabulary one in :mod:`llmprune.structured.vocab`, imported
here so that every criterion is known once this package is.
"""

from .base import Criterion, available_criteria, final_refits, get_criterion, register_criterion
from .units import UnitCriterion, available_unit_criteria, get_unit_criterion, register_unit_criterion
from . import block_influence, fluctuation, magnitude, obs, routing_mass, single_unit, taylor, wanda  # noqa: F401
from .. import hidden, vocab  # noqa: F401,E402  (registration of the hidden-channel and vocabulary criteria)

__all__ = ["Criterion", "available_criteria", "final_refits", "get_criterion", "register_criterion", "UnitCriterion",
           "available_unit_criteria", "get_unit_criterion", "register_unit_criterion"]
