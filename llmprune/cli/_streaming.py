"""The streaming options shared by ``llmprune prune`` and ``llmprune sparsify`` (see :mod:`llmprune.streaming`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .table import relative_change

__all__ = ["add_streaming_arguments", "wants_streaming", "local_folder", "run_streamed", "layer_device",
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
    from ..checkpoint.gguf_load import find_gguf

    if find_gguf(path) is not None:  # a GGUF is loaded in memory (dequantised); --streaming refuses it
        return False
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return False  # not a model folder: loading it says what is missing (not a streaming message)
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


def run_streamed(args: argparse.Namespace, stream: Callable[..., Any], cfg: Any, calibration: Any, out: Path,
                 recipe: dict[str, Any], title: str | Callable[[Any], str], **options: Any) -> tuple[Any, list[tuple[str, str, str, str]]]:
    """Run ``stream`` (:func:`~llmprune.streaming.prune_streaming` or ``sparsify_streaming``) on the local folder
    of ``args.model`` with the shared options; returns its result and the table's rows (parameters, size on
    disk, memory budget, calibration throughput); the caller adds its own rows and prints. ``options``: further
    keyword arguments of ``stream``; ``title`` may be a function of the result (the settings it resolved)."""
    from ..checkpoint.io import load_tokenizer
    from ..eval.efficiency import size_on_disk
    from ..streaming import memory_budget, parse_memory, refuse_gguf

    refuse_gguf(args.model)
    src = local_folder(args.model)
    tokenizer = load_tokenizer(src)
    if calibration is not None:  # the context only: streamed calibration states spill to disk
        from ..calibration.calibrate import check_calibration_fits
        from ..checkpoint.io import load_config

        check_calibration_fits(load_config(src), cfg.n_samples, cfg.seq_len, budget=1 << 62)
    budget = parse_memory(args.max_memory)
    result = stream(src, cfg, out, tokenizer=tokenizer, calibration=calibration, device=layer_device(args),
                    dtype=args.dtype, resume=args.resume, overwrite=args.overwrite, max_memory=budget,
                    progress=not args.quiet, extra={"calibration": args.calib, "run": recipe}, **options)
    tokens = cfg.n_samples * cfg.seq_len if calibration else 0
    size_before, size_after = size_on_disk(src), size_on_disk(out)
    rows = [("", "before", "after", "change"),
            ("parameters", f"{result.params_before:,}", f"{result.params_after:,}",
             relative_change(result.params_before, result.params_after)),
            ("size on disk (MB)", f"{size_before / 1e6:.2f}", f"{size_after / 1e6:.2f}",
             relative_change(size_before, size_after)),
            ("memory budget (GB)", "", f"{memory_budget(budget) / 1e9:.1f}", "")]
    if tokens:
        rows.append(("calibration tokens/s (through pruning)", "", f"{tokens / max(result.seconds, 1e-9):,.0f}", ""))
    print(f"\nllmprune: {title(result) if callable(title) else title}, streamed -> {out}")
    return result, rows
