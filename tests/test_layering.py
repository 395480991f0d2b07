"""The package's layering: every module imports alone, and imports only point down the table below.

Each folder may import the folders listed for it (and itself). Modules are read with ``ast`` (function-level
imports count too), so a circle between folders cannot hide in a local import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: folder -> the folders it may import, lowest layer first
LAYERS = {
    "kernels": set(),
    "core": set(),
    "arch": {"core"},
    "calibration": {"core", "arch"},
    "checkpoint": {"core", "arch"},
    "sparsity": {"core", "arch", "calibration", "checkpoint"},
    "structured": {"core", "arch", "calibration", "checkpoint"},
    "eval": {"core", "calibration", "checkpoint"},
    "training": {"core", "arch", "calibration", "checkpoint", "structured", "sparsity", "eval"},
    "streaming": {"core", "arch", "calibration", "checkpoint", "structured", "sparsity"},
    "runtime": {"core", "checkpoint", "sparsity", "kernels"},
    "top": {"core", "arch", "calibration", "checkpoint", "structured", "sparsity", "training", "streaming",
            "runtime", "eval"},  # llmprune/__init__
    "cli": {"core", "arch", "calibration", "checkpoint", "structured", "sparsity", "training", "streaming",
            "runtime", "eval", "top"},
}
#: the floor plan: entries at the top of llmprune/, and the longest module outside cli/ (lines)
MAX_TOP_ENTRIES = 12
MAX_MODULE_LINES = 450
SOURCES = {"llmprune": ROOT / "llmprune", "llmprune.kernels": ROOT / "triton_kernels", "llmprune.eval": ROOT / "eval"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            if pkg == "llmprune" and rel and rel[0] == "__main__":
                continue
            out[".".join((pkg,) + rel)] = path
    return out


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "top"
    if parts == ["eval", "cli"]:  # the eval harness's own command line builds on the package's
        return "cli"
    return parts[0]


def imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import a, b
                    out.update(f"{target}.{a.name}" for a in node.names)
                    continue
            else:
                target = node.module or ""
            if target.startswith("llmprune"):
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("llmprune"))
    return out


_THIRD_PARTY = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print("\\n".join(sorted(m for m in sys.modules if m.split(".")[0] not in ("llmprune", "__main__"))))
"""

_ALONE = """
import importlib, os, sys
# Every third-party module that importing the whole package loads (read by a first process), loaded once
# here; then each llmprune module imports in a fresh fork, so a missing intra-package import still fails
# while the forks skip re-importing transformers' modeling files (2 min -> seconds on 2 cores).
for name in sys.stdin.read().split():
    try:
        importlib.import_module(name)
    except BaseException:
        pass
assert not any(m == "llmprune" or m.startswith("llmprune.") for m in sys.modules)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(name, type(e).__name__, e, flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    names = sorted(modules())
    third = subprocess.run([sys.executable, "-c", _THIRD_PARTY, *names], capture_output=True, text=True, env=env,
                           timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    r = subprocess.run([sys.executable, "-c", _ALONE, *names], input=third.stdout, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_imports_point_down_the_layer_table():
    mods = modules()
    wrong = []
    for name, path in mods.items():
        own = layer(name)
        allowed = LAYERS.get(own, set()) | {own}
        for target in imports(name, path):
            if target == "llmprune" or target.startswith("llmprune.__"):
                wrong.append(f"{name} imports the package root ({target})")
                continue
            if layer(target) not in allowed:
                wrong.append(f"{name} ({own}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    mods = modules()
    graph = {n: {t if t in mods else t.rsplit(".", 1)[0] for t in imports(n, p)} & set(mods) for n, p in mods.items()}
    for g in graph.values():
        g.discard("llmprune")
    state: dict[str, int] = {}
    circles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                circles.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not circles, circles


def test_table_has_no_circles_and_every_folder_is_in_it():
    folders = {layer(n) for n in modules()}
    assert folders <= set(LAYERS), folders - set(LAYERS)
    for name, allowed in LAYERS.items():
        for other in allowed:
            assert name not in LAYERS[other], (name, other)


def test_floor_plan_is_small():
    """A reader finds a stage by its folder: few entries at the top, no module too long to read in one go."""
    top = sorted(p.name for p in (ROOT / "llmprune").iterdir() if p.name != "__pycache__")
    assert len(top) <= MAX_TOP_ENTRIES, top
    long = {name: n for name, path in modules().items()
            if layer(name) != "cli" and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
