"""Importance criteria, one file each, registered by name (pure functions of weights and statistics)."""

from .base import Criterion, available_criteria, get_criterion, register_criterion
from . import fluctuation, magnitude, obs, single_unit, taylor, wanda  # noqa: F401  (registration)

__all__ = ["Criterion", "available_criteria", "get_criterion", "register_criterion"]
