"""Moved to :mod:`llmprune.structured.pipeline`; kept for compatibility."""

from .structured.pipeline import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.pipeline.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
