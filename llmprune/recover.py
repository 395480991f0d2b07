"""Moved to :mod:`llmprune.training.recover`; kept for compatibility."""

from .training.recover import *  # noqa: F401,F403
