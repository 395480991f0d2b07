"""Moved to :mod:`llmprune.core.allocate`; kept for compatibility."""

from .core.allocate import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.allocate.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
