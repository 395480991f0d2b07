"""Moved to :mod:`llmprune.structured.select`; kept for compatibility."""

from .structured.select import *  # noqa: F401,F403
