"""One import namespace: the distribution installs only the ``llmprune`` top-level package.

The repository keeps ``triton_kernels/`` and ``eval/`` at its top level, but they install as
``llmprune.kernels`` and ``llmprune.eval``, so llmprune never shadows Triton's own ``triton_kernels``
package or PyPI's ``eval``.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_only_llmprune_is_a_top_level_package():
    dist = importlib.metadata.distribution("llmprune")
    assert (dist.read_text("top_level.txt") or "").split() == ["llmprune"]
    owners = importlib.metadata.packages_distributions()
    assert sorted(name for name, dists in owners.items() if "llmprune" in dists) == ["llmprune"]


def test_subpackages_import_outside_the_repository(tmp_path):
    # Run from an empty folder so the repository root is not on sys.path.
    code = (
        "import importlib.util, llmprune.kernels, llmprune.eval, llmprune.eval.tasks, llmprune.runtime\n"
        "from llmprune.eval import perplexity\n"
        "from llmprune.kernels import act_sparse_gemv_reference\n"
        "for name in ('eval', 'triton_kernels'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    assert spec is None or 'llmprune' not in str(spec.origin), (name, spec.origin)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_wheel_contains_only_llmprune(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ in the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("llmprune", "triton_kernels", "eval"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("llmprune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"llmprune"}
    # every source module is in the wheel (a new subpackage must be listed in pyproject.toml)
    expected = {f"llmprune/{p.relative_to(REPO / 'llmprune').as_posix()}" for p in (REPO / "llmprune").rglob("*.py")}
    for folder, target in (("triton_kernels", "kernels"), ("eval", "eval")):
        expected |= {f"llmprune/{target}/{p.relative_to(REPO / folder).as_posix()}" for p in (REPO / folder).rglob("*.py")}
    assert sorted(expected - set(names)) == []
    assert "llmprune/eval/tasks/llmprune_piqa.yaml" in names  # task YAMLs ship with the package
    assert "llmprune/eval/tasks/local_data.py" in names
