"""Moved to :mod:`llmprune.structured.pipeline`; kept for compatibility."""

from .structured.pipeline import *  # noqa: F401,F403
