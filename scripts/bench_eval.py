#!/usr/bin/env python
"""Benchmark the eval harness on one model: perplexity throughput, prefill/decode speed, memory.

Speed numbers belong here, not in unit tests. Example:
    PYTHONPATH=. python scripts/bench_eval.py ../shared/models/ref-llama-7m \
        --ppl ../shared/data/wikitext2-raw-test.txt --seq-len 256 --max-tokens 60000 --json /tmp/bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llmprune.eval.cli import load_model
from llmprune.eval.efficiency import count_parameters, macs_per_token, measure_speed, peak_memory
from llmprune.eval.perplexity import load_text, perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ppl", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=60_000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load_model(args.model, args.dtype, args.device)
    text = load_text(args.ppl)
    t0 = time.perf_counter()
    ppl = perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size)
    ppl_s = time.perf_counter() - t0
    row = {
        "model": args.model, "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "perplexity": ppl.to_dict(), "ppl_seconds": ppl_s, "ppl_tokens_per_s": ppl.n_input_tokens / ppl_s,
        "params": count_parameters(model)["total"], "macs_per_token": macs_per_token(model, args.seq_len),
        "speed": measure_speed(model, tok, batch_sizes=(1, 8), warmup=2, repeats=args.repeats),
        "memory": peak_memory(model, tok, seq_len=args.seq_len, batch_size=args.batch_size),
    }
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=2)


if __name__ == "__main__":
    main()
