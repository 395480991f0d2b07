"""Moved to :mod:`llmprune.core.memory`; kept for compatibility."""

from .core.memory import *  # noqa: F401,F403
