"""Moved to :mod:`llmprune.calibration.single_unit`; kept for compatibility."""

from .calibration.single_unit import *  # noqa: F401,F403
