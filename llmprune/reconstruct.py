"""Moved to :mod:`llmprune.structured.reconstruct`; kept for compatibility."""

from .structured.reconstruct import *  # noqa: F401,F403
