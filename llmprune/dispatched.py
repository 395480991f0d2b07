"""Moved to :mod:`llmprune.checkpoint.dispatched`; kept for compatibility."""

from .checkpoint.dispatched import *  # noqa: F401,F403
