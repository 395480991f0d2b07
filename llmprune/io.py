"""Moved to :mod:`llmprune.checkpoint.io`; kept for compatibility."""

from .checkpoint.io import *  # noqa: F401,F403
