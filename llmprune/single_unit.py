"""Moved to :mod:`llmprune.calibration.single_unit`; kept for compatibility."""

from .calibration.single_unit import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.single_unit.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
