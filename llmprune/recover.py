"""Moved to :mod:`llmprune.training.recover`; kept for compatibility."""

from .training.recover import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.recover.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
