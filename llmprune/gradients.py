"""Moved to :mod:`llmprune.calibration.gradients`; kept for compatibility."""

from .calibration.gradients import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.gradients.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
