"""Moved to :mod:`llmprune.structured.score`; kept for compatibility."""

from .structured.score import *  # noqa: F401,F403
