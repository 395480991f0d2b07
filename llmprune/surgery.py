"""Moved to :mod:`llmprune.structured.surgery`; kept for compatibility."""

from .structured.surgery import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.surgery.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
