"""Giving freed CPU memory back to the operating system.

Layer-by-layer work (streaming, gradients freed one parameter at a time) allocates and frees many
megabyte-sized tensors. glibc serves them from its heap once its dynamic mmap threshold has grown, and freed
heap memory stays in the process as fragments: measured here, a streamed 0.5B model's peak RSS grew by 0.24 GB
per layer (3.2 GB in all, 0.86 GB with a fixed mmap threshold), and the ``taylor`` pass on a 0.43B model
peaked at 1.7 GB instead of 0.8 GB. ``malloc_trim`` hands the free pages back.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["release_freed_memory", "available_memory"]

_TRIM = None


def release_freed_memory() -> None:
    """``malloc_trim(0)`` where the C library is glibc; a no-op elsewhere."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def available_memory() -> int:
    """Memory this process can still use (``MemAvailable``), or 8 GiB where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
