"""The CPU's model name, for the "machine" line every benchmark writes beside its numbers."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """``/proc/cpuinfo``'s "model name" (Linux), else ``lscpu``'s "Model name", else the architecture
    (``platform.machine()``): never raises, so a benchmark never fails for want of a label."""
    info = Path("/proc/cpuinfo")
    try:
        if info.is_file():
            for line in info.read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        pass
    return platform.machine() or "cpu"
