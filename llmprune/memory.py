"""Moved to :mod:`llmprune.core.memory`; kept for compatibility."""

from .core.memory import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.memory.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
