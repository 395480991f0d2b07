"""Moved to :mod:`llmprune.calibration.calibrate`; kept for compatibility."""

from .calibration.calibrate import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.calibrate.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
