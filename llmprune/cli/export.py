"""``llmprune export``: write a saved (pruned) model folder as a GGUF file for llama.cpp and Ollama, checked in
llama.cpp before it is reported written.

Example::

    llmprune export runs/pruned --format gguf --out runs/pruned.gguf --outtype q8_0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._registry import subcommand

__all__ = ["add_arguments", "run", "add_export_arguments", "export_after_save", "gguf_name", "check_export_possible"]

FORMATS = ("gguf",)


def add_export_arguments(p: argparse.ArgumentParser, standalone: bool) -> None:
    """``--outtype`` (and, standalone, ``--format``/``--out``); ``prune`` adds ``--export gguf`` with these."""
    from ..checkpoint.gguf_export import OUTTYPES

    if standalone:
        p.add_argument("--format", choices=FORMATS, default="gguf", help="output format (default gguf)")
        p.add_argument("--out", required=True, help="output .gguf file (must not exist unless --overwrite)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="GGUF weight type (default f16; q8_0 keeps f16 where a row is not whole 32-value blocks; "
                        "q4_k_m / q5_k_m are made from f16 by llama.cpp's own quantizer, with its fallback types)")
    p.add_argument("--gguf-threads", type=int, default=None, help="llama.cpp threads for the check (default: up to 4)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="model folder written by 'llmprune prune' (or any Llama-family safetensors folder)")
    add_export_arguments(p, standalone=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check in llama.cpp (logits vs transformers, tokenizer); without llama-cpp-python "
                        "installed this is the only way to export")


def export_after_save(folder: str, out: str, outtype: str, verify: bool, overwrite: bool,
                      threads: int | None = None) -> str:
    """Export ``folder`` to ``out`` and return the one-line summary (used by ``export`` and ``prune --export``)."""
    from ..checkpoint.gguf_export import export_gguf

    return export_gguf(folder, out, outtype=outtype, verify=verify, overwrite=overwrite, threads=threads).summary()


def gguf_name(folder: str | Path, outtype: str) -> str:
    """``<folder name>-<OUTTYPE>.gguf``: Ollama's ``hf.co/<repo>:<tag>`` picks a repository's file by this suffix."""
    return f"{Path(folder).name}-{outtype.upper()}.gguf"


def check_export_possible(config: Any, verify: bool) -> None:
    """Raise the export's one-line error before pruning when the family, a setting or the check cannot work."""
    from ..checkpoint.gguf_export import GGUFExportError, refuse_unsupported
    from ..checkpoint.llamacpp import llamacpp_available

    refuse_unsupported(config)
    if verify and not llamacpp_available():
        raise GGUFExportError("--export gguf checks the file in llama.cpp, which needs llama-cpp-python: "
                              "pip install 'llmprune[llamacpp]' (or pass --no-verify to skip the check)")


@subcommand("export", "write a saved model as a GGUF file for llama.cpp / Ollama (checked in llama.cpp)", add_arguments)
def run(args: argparse.Namespace) -> int:
    print(f"llmprune: {export_after_save(args.folder, args.out, args.outtype, not args.no_verify, args.overwrite, args.gguf_threads)}")
    return 0
