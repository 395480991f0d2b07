"""Quality of structured pruning on the reference model: WikiText-2 perplexity per criterion.

Prunes ``ref-llama-7m`` by the same fraction of heads (whole GQA groups) and FFN neurons, uniform
allocation, no recovery training, with each criterion, and reports perplexity (first N tokens,
non-overlapping windows). Results go to stdout as Markdown and to ``--out`` as JSON.

    python scripts/bench_quality.py --heads 0.25 --ffn 0.25 --methods magnitude,wanda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    shared = Path(os.environ.get("LLMPRUNE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(shared / "models" / "ref-llama-7m"))
    ap.add_argument("--calib", default=str(shared / "data" / "reference-train.txt"))
    ap.add_argument("--ppl", default=str(shared / "data" / "wikitext2-raw-test.txt"))
    ap.add_argument("--heads", type=float, default=0.25)
    ap.add_argument("--ffn", type=float, default=0.25)
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--methods", default="magnitude,wanda")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=60000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bias-compensation", action="store_true", help="FLAP bias compensation for every method")
    ap.add_argument("--keep-tail", action="store_true", help="also score the last partial perplexity window")
    ap.add_argument("--out", default=None, help="JSON output file")
    args = ap.parse_args()

    from llmprune.eval.perplexity import load_text, perplexity
    from llmprune import PruneConfig, load_model, prune
    from llmprune.pipeline import count_parameters
    from llmprune.cli.table import block_parameters

    text = load_text(args.ppl)
    rows = []
    model, tok = load_model(args.model)
    dense = perplexity(model, tok, text, seq_len=args.ppl_seq_len, max_tokens=args.max_tokens, progress=False,
                       drop_last=not args.keep_tail)
    rows.append({"method": "dense", "params": count_parameters(model),
                 "block_params": block_parameters(model), "ppl": dense.ppl, "tokens": dense.n_tokens})
    for method in args.methods.split(","):
        model, tok = load_model(args.model)
        cfg = PruneConfig(heads=args.heads, ffn=args.ffn, method=method, allocation=args.allocation,
                          n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                          bias_compensation=args.bias_compensation)
        t0 = time.perf_counter()
        result = prune(model, cfg, tokenizer=tok, calibration=args.calib, progress=False)
        seconds = time.perf_counter() - t0
        r = perplexity(model, tok, text, seq_len=args.ppl_seq_len, max_tokens=args.max_tokens, progress=False,
                       drop_last=not args.keep_tail)
        rows.append({"method": method, "params": result.params_after, "block_params": block_parameters(model),
                     "ppl": r.ppl, "tokens": r.n_tokens, "prune_seconds": round(seconds, 2)})
    base_block = rows[0]["block_params"]
    print(f"ref-llama-7m, heads {args.heads:g} + FFN {args.ffn:g} removed ({args.allocation}), no recovery; "
          f"WikiText-2 raw test, first {args.max_tokens} tokens, {args.ppl_seq_len}-token windows; "
          f"calibration {args.n_samples}x{args.seq_len} tokens, seed {args.seed}"
          f"{', bias compensation' if args.bias_compensation else ''}; {platform.processor() or platform.machine()}")
    print("\n| method | params | block params removed | perplexity |\n|---|---|---|---|")
    for r in rows:
        removed = 1 - r["block_params"] / base_block
        print(f"| {r['method']} | {r['params']:,} | {removed:.1%} | {r['ppl']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
