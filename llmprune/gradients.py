"""Moved to :mod:`llmprune.calibration.gradients`; kept for compatibility."""

from .calibration.gradients import *  # noqa: F401,F403
