"""Moved to :mod:`llmprune.core.progress`; kept for compatibility."""

from .core.progress import *  # noqa: F401,F403
