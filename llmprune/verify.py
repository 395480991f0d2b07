"""Moved to :mod:`llmprune.checkpoint.verify`; kept for compatibility."""

from .checkpoint.verify import *  # noqa: F401,F403
