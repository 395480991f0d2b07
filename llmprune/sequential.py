"""Moved to :mod:`llmprune.structured.sequential`; kept for compatibility."""

from .structured.sequential import *  # noqa: F401,F403
