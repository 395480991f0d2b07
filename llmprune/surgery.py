"""Moved to :mod:`llmprune.structured.surgery`; kept for compatibility."""

from .structured.surgery import *  # noqa: F401,F403
from .structured.surgery import _complement  # noqa: F401
from .structured.apply import apply_plan  # noqa: F401
