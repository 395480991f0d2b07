"""Moved to :mod:`llmprune.core.allocate`; kept for compatibility."""

from .core.allocate import *  # noqa: F401,F403
