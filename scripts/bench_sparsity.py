#!/usr/bin/env python
"""Perplexity of the reference model under weight sparsity and dynamic activation sparsity.

Rows: dense; magnitude / wanda / sparsegpt at 50% unstructured and 2:4; TEAL-style activation
sparsity at 25/40/50% (thresholds calibrated on the calibration text, sparsity measured on the
evaluation text). Perplexity: WikiText-2 raw test, first 60k tokens, non-overlapping 256-token windows
(``llmprune.eval.perplexity.perplexity``, every one of the first 60k tokens scored).

    PYTHONPATH=$PWD LLMPRUNE_SHARED=/work/shared HF_HUB_OFFLINE=1 python scripts/bench_sparsity.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune.calibration.calibrate import calibration_batches, read_calibration_text  # noqa: E402
from llmprune.sparsity import (  # noqa: E402
    SparsityConfig,
    apply_activation_sparsity,
    calibrate_activation_thresholds,
    sparsify,
)

SHARED = Path(os.environ.get("LLMPRUNE_SHARED", "/work/shared"))


@torch.no_grad()
def perplexity(model, tokenizer, text, seq_len=256, max_tokens=60000) -> tuple[float, str]:
    """The project's protocol (llmprune.eval.perplexity), scoring all ``max_tokens`` tokens (tail window kept)."""
    from llmprune.eval.perplexity import perplexity as ppl

    result = ppl(model, tokenizer, text, seq_len=seq_len, max_tokens=max_tokens, drop_last=False, progress=False)
    return result.ppl, "llmprune.eval.perplexity (tail kept)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama-7m"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--eval", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=60000)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--act", default="0.25,0.4,0.5", help="activation sparsity targets ('' for none)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    load = lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_kernels=False,  # noqa: E731
                                                        trust_remote_code=False).eval()
    text = Path(args.eval).read_text(encoding="utf-8")
    batches = calibration_batches(tok, read_calibration_text(args.calib), args.n_samples, args.seq_len, args.seed)
    rows = []

    def row(name, ppl, sparsity, secs, note=""):
        rows.append({"setting": name, "ppl": ppl, "sparsity": sparsity, "seconds": secs, "note": note})
        print(f"{name:34s} ppl={ppl:9.2f}  sparsity={sparsity:.4f}  {secs:6.1f}s {note}", flush=True)

    model = load()
    ppl, how = perplexity(model, tok, text, max_tokens=args.max_tokens)
    print(f"perplexity via {how}")
    row("dense", ppl, 0.0, 0.0)

    for pattern in [p for p in args.patterns.split(",") if p]:
        for method in [m for m in args.methods.split(",") if m]:
            model = load()
            cfg = SparsityConfig(method=method, sparsity=0.5, pattern=pattern, n_samples=args.n_samples,
                                 seq_len=args.seq_len, seed=args.seed)
            rep = sparsify(model, cfg, calibration=batches, progress=False)
            ppl, _ = perplexity(model, tok, text, max_tokens=args.max_tokens)
            row(f"{method} 50% {pattern}", ppl, rep.overall_sparsity, rep.seconds, "weight sparsity of targets")

    model = load()
    for target in [float(a) for a in args.act.split(",") if a]:
        t0 = time.perf_counter()
        th = calibrate_activation_thresholds(model, calibration=batches, sparsity=target, progress=False)
        secs = time.perf_counter() - t0
        with apply_activation_sparsity(model, th, track=True) as h:
            ppl, _ = perplexity(model, tok, text, max_tokens=args.max_tokens)
        row(f"TEAL activation {target:.0%}", ppl, h.overall(), secs, "achieved on eval text")

    print("\n| setting | WikiText-2 ppl | achieved sparsity | time (s) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['ppl']:.2f} | {r['sparsity']:.4f} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
