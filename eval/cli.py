"""``llmprune eval``: evaluate one or more saved models side by side.

``llmprune/cli/evaluate.py`` calls :func:`add_arguments` on its ``eval`` sub-parser and
:func:`run` with the parsed arguments; :func:`main` runs it standalone
(``python -m llmprune.eval.cli ...``).

Example:
    $ llmprune eval ../shared/models/ref-llama-7m runs/pruned --ppl ../shared/data/wikitext2-raw-test.txt \\
        --seq-len 256 --max-tokens 60000 --tasks lambada,piqa --limit 200 --out runs/eval
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["add_arguments", "load_model", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the eval options to ``parser`` (a sub-parser of ``llmprune`` or a fresh one)."""
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model folders, Hub ids or .gguf files; the first is the baseline")
    parser.add_argument("--ppl", metavar="FILE_OR_NAME", help="text file or wikitext2|ptb|c4 for perplexity")
    parser.add_argument("--seq-len", type=int, default=None, help="window length L (default: model max, capped at 2048)")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: L, non-overlapping)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--keep-tail", action="store_true", help="also score the final partial window")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. lambada,piqa,openbookqa")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-speed", action="store_true", help="skip latency/throughput and memory")
    parser.add_argument("--speed-batch-sizes", default="1,8", help="batch sizes for speed, e.g. 1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--names", default=None, help="comma-separated labels (default: folder names)")
    parser.add_argument("--out", default="runs/eval",
                        help="new output folder for report.json/.md/.png (default runs/eval)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def load_model(path: str, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any]:
    """Model and tokenizer from a folder or Hub id, through :func:`llmprune.checkpoint.io.load_model`
    (safetensors only, checkpoint validated, llmprune's per-layer classes registered)."""
    import torch

    from llmprune.checkpoint.io import load_model as load_checked

    model, tokenizer = load_checked(str(Path(path).expanduser()) if Path(path).expanduser().exists() else path,
                                    dtype=getattr(torch, dtype),
                                    device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    """Run ``llmprune eval`` for parsed ``args``; prints the table, returns an exit code."""
    from llmprune.checkpoint.output import check_output_path

    from .api import evaluate

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise ValueError("--tasks is empty: name tasks (e.g. --tasks lambada,piqa) or leave --tasks out")
    check_output_path(args.out, sources=[*args.models, args.ppl], overwrite=args.overwrite)  # before loading
    names = args.names.split(",") if args.names else [Path(p).name or p for p in args.models]
    if len(names) != len(args.models):
        raise ValueError(f"--names has {len(names)} labels for {len(args.models)} models.")
    if len(set(names)) != len(names):  # two folders with the same name
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    models = {}
    for name, path in zip(names, args.models):
        model, tok = load_model(path, args.dtype, args.device)
        models[name] = (model, tok, path)
    report = evaluate(
        models, ppl=args.ppl, seq_len=args.seq_len, max_tokens=args.max_tokens, tasks=tasks,
        limit=args.limit, out_dir=args.out, speed=not args.no_speed, stride=args.stride,
        batch_size=args.batch_size, batch_sizes=[int(b) for b in args.speed_batch_sizes.split(",")],
        warmup=args.warmup, repeats=args.repeats, drop_last=not args.keep_tail,
        progress=not getattr(args, "quiet", False), verbose=getattr(args, "verbose", False),
        overwrite=args.overwrite,
    )
    print(report.to_text())
    print(f"\nwrote {args.out}/report.json, report.md, report.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m llmprune.eval.cli MODEL [MODEL2 ...] --ppl ... --out DIR``."""
    from llmprune.cli._common import add_global_arguments, configure_output

    parser = add_arguments(argparse.ArgumentParser(prog="llmprune eval", description=__doc__.splitlines()[0]))
    add_global_arguments(parser)
    args = parser.parse_args(argv)
    configure_output(args)
    try:
        return run(args)
    except (OSError, ValueError) as err:  # FileNotFoundError, OutputExistsError, OutputPathError
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
