"""Moved to :mod:`llmprune.checkpoint.verify`; kept for compatibility."""

from .checkpoint.verify import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.verify.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
