"""Moved to :mod:`llmprune.core.config`; kept for compatibility."""

from .core.config import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.config.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
