"""Moved to :mod:`llmprune.core.progress`; kept for compatibility."""

from .core.progress import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.progress.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
