"""Moved to :mod:`llmprune.core.config`; kept for compatibility."""

from .core.config import *  # noqa: F401,F403
