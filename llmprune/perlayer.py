"""Moved to :mod:`llmprune.structured.perlayer`; kept for compatibility."""

from .structured.perlayer import *  # noqa: F401,F403
