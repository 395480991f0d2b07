"""Moved to :mod:`llmprune.training.iterative`; kept for compatibility."""

from .training.iterative import *  # noqa: F401,F403
