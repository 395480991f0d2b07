"""The errors of checkpoint I/O (a module of their own, so every checkpoint module can raise them)."""

from __future__ import annotations

__all__ = ["CheckpointError", "OutputExistsError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or not in safetensors format."""


class OutputExistsError(FileExistsError):
    """The output directory exists and overwriting was not asked for."""
