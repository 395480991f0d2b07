"""The streaming options shared by ``llmprune prune`` and ``llmprune sparsify`` (see :mod:`llmprune.streaming`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_streaming_arguments", "wants_streaming", "local_folder", "streaming_rows", "layer_device",
           "refuse_with_streaming"]


def add_streaming_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streaming", action="store_true",
                   help="one decoder layer in memory at a time, read from and written to safetensors shards "
                        "(automatic when the model does not fit --max-memory); same output as in memory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted streamed run from its last finished layer (implies --streaming)")
    p.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 24GB (default: 80%% of the available memory); larger models are "
                        "streamed, and streamed calibration states above a quarter of it are spilled to disk")


def local_folder(model: str) -> Path:
    """A local folder for ``model``: itself, or the Hub snapshot (safetensors, configs, tokenizer) in the cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                         "*.txt"]))


def wants_streaming(args: argparse.Namespace) -> bool:
    """``--streaming`` / ``--resume``, or a local model larger than the memory budget."""
    from ..streaming import parse_memory, should_stream

    if args.streaming or args.resume:
        return True
    path = Path(args.model)
    if not path.is_dir():
        return False
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if should_stream(path, parse_memory(args.max_memory), dtype):
        print(f"llmprune: {path.name} does not fit the memory budget; streaming it one layer at a time")
        return True
    return False


def layer_device(args: argparse.Namespace) -> str:
    """Where each streamed layer runs: ``--device``, else the GPU when there is one (the model stays on CPU)."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def refuse_with_streaming(args: argparse.Namespace, **options: Any) -> None:
    """Options a streamed run cannot honour, with what to do instead."""
    for flag, given in options.items():
        if given:
            raise ValueError(f"{flag} is not available with --streaming (the model is never whole in memory); "
                             "run `llmprune eval OUT` on the output, or prune in memory")


def streaming_rows(budget: int | None, tokens: int, seconds: float) -> list[tuple[str, str]]:
    from ..streaming import available_memory

    rows = [("memory budget (GB)", f"{(budget or int(0.8 * available_memory())) / 1e9:.1f}")]
    if tokens:
        rows.append(("calibration tokens/s (through pruning)", f"{tokens / max(seconds, 1e-9):,.0f}"))
    return rows
