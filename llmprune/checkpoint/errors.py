"""The errors of checkpoint I/O (a module of their own, so every checkpoint module can raise them)."""

from __future__ import annotations

__all__ = ["CheckpointError", "OutputExistsError", "OutputPathError", "GGUFExportError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or not in safetensors format."""


class OutputExistsError(FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class OutputPathError(ValueError):
    """The output path cannot or must not be written: a file, the source model or a folder holding it, or a
    folder without write permission."""


class GGUFExportError(CheckpointError):
    """The model cannot be written as a GGUF file that llama.cpp runs (the message names what does work)."""
