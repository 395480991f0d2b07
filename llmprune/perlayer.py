"""Moved to :mod:`llmprune.structured.perlayer`; kept for compatibility."""

from .structured.perlayer import *  # noqa: F401,F403
"""Moved to :mod:`llmprune.perlayer.`; kept for compatibility."""

from .. import *  # noqa: F401,F403
