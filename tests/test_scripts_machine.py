"""scripts/_machine.py: the CPU label every benchmark writes; it must never raise."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import _machine  # noqa: E402


def test_cpu_name_is_a_label():
    name = _machine.cpu_name()
    assert isinstance(name, str) and name and "\n" not in name


def test_cpu_name_falls_back_without_cpuinfo_or_lscpu(monkeypatch):
    monkeypatch.setattr(_machine.Path, "is_file", lambda self: False)

    def no_lscpu(*a, **k):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(_machine.subprocess, "run", no_lscpu)
    monkeypatch.setattr(_machine.platform, "machine", lambda: "riscv64")
    assert _machine.cpu_name() == "riscv64"
