"""Moved to :mod:`llmprune.training.one_cycle`; kept for compatibility."""

from .training.one_cycle import *  # noqa: F401,F403
from .training.one_cycle import pinned_scores  # noqa: F401
