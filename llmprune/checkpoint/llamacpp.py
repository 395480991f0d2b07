"""Run a GGUF file in llama.cpp (through llama-cpp-python) in a child process: logits and tokenization.

The GGUF export checks every file this way before it is renamed into place. The child is a separate Python
process because llama.cpp aborts the whole process on some malformed files (``GGML_ASSERT``); the parent then
reports one line and removes the temporary file. The child imports only ``llama_cpp`` and ``numpy``.

Install with ``pip install 'llmprune[llamacpp]'`` (a source build of llama.cpp with cmake and a C++ compiler).

Example::

    result = run_gguf("model.gguf", ids=[1, 2, 3], texts=["Hello"])
    result["logits"]        # (3, vocab) float32, every position
    result["tokens"]        # [[...]]: llama.cpp's tokens of each text, special tokens parsed, no BOS added
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LlamaCppError", "llamacpp_available", "run_gguf", "quantize_gguf", "LLAMACPP_QUANT_TYPES"]

# type_k/type_v 0 = GGML_TYPE_F32: the check compares weights, not llama.cpp's f16 KV cache rounding.
_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
req = json.load(open(sys.argv[1]))
ids = req["ids"]
llm = Llama(model_path=req["path"], n_ctx=max(64, len(ids) + 8), n_batch=max(64, len(ids)), logits_all=True,
            n_threads=req["threads"], n_threads_batch=req["threads"], type_k=0, type_v=0, verbose=False,
            n_gpu_layers=0)
llm.eval(ids)
np.save(req["logits"], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
tokens = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in req["texts"]]
json.dump({"tokens": tokens, "n_vocab": llm.n_vocab()}, open(req["result"], "w"))
"""


#: outtypes made by llama.cpp's own quantizer (llama_model_quantize) from an f16 file, by llama_ftype value
LLAMACPP_QUANT_TYPES = {"q4_k_m": 15, "q5_k_m": 17}

_QUANTIZE_CHILD = r"""
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(0 if rc == 0 else 3)
"""


class LlamaCppError(RuntimeError):
    """llama.cpp could not load or run a GGUF file (the message is llama.cpp's last error line)."""


def llamacpp_available() -> bool:
    """Whether llama-cpp-python is installed (without importing it: it loads a shared library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _error_line(stderr: str, returncode: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        low = ln.lower()
        if "error" in low or "failed" in low or "assert" in low or "exception" in low:
            return ln[:300]
    return (lines[-1][:300] if lines else f"exit code {returncode}")


def run_gguf(path: str | os.PathLike, ids: list[int], texts: list[str] | None = None, threads: int | None = None,
             timeout: float = 600.0) -> dict[str, Any]:
    """Load ``path`` in llama.cpp in a child process, evaluate ``ids`` and tokenize ``texts``.

    Returns ``{"logits": (len(ids), vocab) array, "tokens": [[int]], "n_vocab": int}``; raises
    :class:`LlamaCppError` with llama.cpp's error line when the file does not load or run.
    """
    if not llamacpp_available():
        raise LlamaCppError("llama-cpp-python is not installed: pip install 'llmprune[llamacpp]'")
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="llmprune-llamacpp-") as work:
        w = Path(work)
        req = {"path": str(path), "ids": [int(i) for i in ids], "texts": list(texts or []), "threads": int(threads),
               "logits": str(w / "logits.npy"), "result": str(w / "result.json")}
        (w / "req.json").write_text(json.dumps(req))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(w / "req.json")], capture_output=True, text=True,
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise LlamaCppError(f"llama.cpp did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0 or not (w / "result.json").is_file():
            raise LlamaCppError(_error_line(proc.stderr, proc.returncode))
        result = json.loads((w / "result.json").read_text())
        result["logits"] = np.load(w / "logits.npy", allow_pickle=False)
        return result


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, outtype: str, threads: int | None = None,
                  timeout: float = 3600.0) -> None:
    """Quantize the GGUF file ``src`` into ``dst`` with llama.cpp's own quantizer (what ``llama-quantize`` runs), in a
    child process. Tensors whose rows do not fit the type's blocks get llama.cpp's fallback types."""
    if not llamacpp_available():
        raise LlamaCppError(f"--outtype {outtype} runs llama.cpp's quantizer, which needs llama-cpp-python: "
                            "pip install 'llmprune[llamacpp]'")
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    try:
        proc = subprocess.run([sys.executable, "-c", _QUANTIZE_CHILD, str(src), str(dst),
                               str(LLAMACPP_QUANT_TYPES[outtype]), str(threads)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlamaCppError(f"llama.cpp's quantizer did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0 or not Path(dst).is_file():
        raise LlamaCppError(f"llama.cpp's quantizer failed: {_error_line(proc.stderr, proc.returncode)}")
