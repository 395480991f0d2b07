"""Moved to :mod:`llmprune.calibration.calibrate`; kept for compatibility."""

from .calibration.calibrate import *  # noqa: F401,F403
from .calibration.calibrate import all_reduce_sum, world  # noqa: F401
