"""``llmprune analyze``: the seed's per-layer view of single-unit performance — per decoder layer, the share of
heads and FFN neurons with no label cluster, and the calibration loss with exactly those removed from that layer
alone (:mod:`llmprune.structured.analyze`). A table on stdout; with ``--out``, ``analysis.json`` and
``analysis.png`` in a new folder.

Example::

    llmprune analyze ../shared/models/ref-llama-7m --calib ../shared/data/reference-train.txt --out runs/analysis
"""

from __future__ import annotations

import argparse
import json

from ._common import add_calibration_arguments, add_runtime_arguments, check_output, read_calibration
from ._registry import subcommand

__all__ = ["add_arguments", "run"]

#: calibration windows of the analysis (each layer's losses are full passes over them)
DEFAULT_SAMPLES = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..calibration.single_unit import DEFAULT_TOP_K, THRESHOLD

    p.add_argument("model", help="local model folder, Hugging Face Hub id, or a .gguf file")
    add_calibration_arguments(p, n_samples=DEFAULT_SAMPLES, needed_by="required")
    p.add_argument("--out", default=None,
                   help="also write analysis.json and analysis.png into this new folder (refused if it exists "
                        "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"the most frequent next tokens of the calibration windows used as labels (default {DEFAULT_TOP_K})")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help=f"the seed's threshold on each unit's max-normalised label matrix (default {THRESHOLD})")
    add_runtime_arguments(p)


@subcommand("analyze", "per layer: the heads and FFN neurons the single-unit test finds non-essential, and the "
            "loss of removing exactly those from that layer alone", add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from ..calibration.calibrate import (CalibrationError, calibration_batches, check_calibration_fits,
                                         model_context)
    from ..checkpoint.io import load_model, public_name
    from ..checkpoint.output import atomic_directory
    from ..structured.analyze import analyze_single_unit, format_report, save_plot

    if args.top_k < 1 or not 0 < args.threshold <= 1 or args.n_samples < 1:
        raise ValueError("--top-k and --n-samples must be >= 1 and --threshold in (0, 1]")
    out = check_output(args) if args.out else None  # fail before any work
    text = read_calibration(args)
    if text is None:
        raise CalibrationError("analyze needs calibration text: pass --calib with a text file or wikitext2|c4|ptb")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    context = model_context(model.config)
    seq_len = args.seq_len or (min(256, context) if context else 256)
    check_calibration_fits(model.config, args.n_samples, seq_len)
    batches = calibration_batches(tokenizer, text, args.n_samples, seq_len, args.seed)
    report = analyze_single_unit(model, batches, top_k=args.top_k, threshold=args.threshold,
                                 progress=not args.quiet)
    print(format_report(report))
    if out is None:
        return 0
    data = {"model": public_name(args.model, keep_relative=True), "calibration": public_name(args.calib, keep_relative=True),
            "seed": args.seed, **report.to_dict()}
    with atomic_directory(out, overwrite=args.overwrite, sources=[args.model, args.calib]) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(data, indent=2) + "\n")
        plotted = save_plot(report, tmp / "analysis.png", title=f"{public_name(args.model)}: single-unit performance")
    print(f"wrote {out / 'analysis.json'}")
    print(f"wrote {out / 'analysis.png'}" if plotted else
          "no plot: matplotlib is not installed (pip install matplotlib); analysis.json has every number")
    return 0
