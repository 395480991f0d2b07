"""Moved to :mod:`llmprune.structured.compensate`; kept for compatibility."""

from .structured.compensate import *  # noqa: F401,F403
