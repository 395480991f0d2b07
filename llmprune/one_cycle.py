"""Moved to :mod:`llmprune.training.one_cycle`; kept for compatibility."""

from .training.one_cycle import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.one_cycle.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
