"""Moved to :mod:`llmprune.calibration.text`; kept for compatibility."""

from .calibration.text import *  # noqa: F401,F403
