"""One ablation row on the real model (issue 23): prune with a PruneConfig given as JSON through the library's
Python API, score WikiText-2 (first 20k tokens, 512-token windows) and append a JSON line.

    python scripts/research/ablate.py TAG '{"heads": 0.333, "method": "obs", "allocation": "fisher"}' \
        [--calib FILE] [--out bench/real_structured/ablations.jsonl] [--threads 1] [--iterative-steps N]

The calibration text defaults to ``../shared/data/reference-train.txt``; the model to scripts/real_model.py's
SmolLM2-135M-Instruct. Fields: tag, config, block params removed, PPL, pruning seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tag")
    ap.add_argument("config", help="PruneConfig fields as JSON")
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--out", default="bench/real_structured/ablations.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterative-steps", type=int, default=1,
                    help="prune in this many equal steps (llmprune.training.prune_iteratively, no recovery between)")
    args = ap.parse_args()

    import torch

    import llmprune
    from llmprune import PruneConfig
    from llmprune.cli.table import block_parameters
    from llmprune.arch.surgery import widths_by_kind
    from llmprune.eval.perplexity import load_text, perplexity

    torch.set_num_threads(args.threads)
    if args.model is None:
        from real_model import real_model_path
        args.model = str(real_model_path())
    model, tok = llmprune.load_model(args.model)
    before = block_parameters(model)
    cfg = PruneConfig(**json.loads(args.config))
    t0 = time.time()
    if args.iterative_steps > 1:
        from llmprune.training.iterative import prune_iteratively

        it = prune_iteratively(model, cfg, args.iterative_steps, tokenizer=tok, calibration=args.calib, progress=False)
        model, result = it.model, it.steps[-1]
    else:
        result = llmprune.prune(model, cfg, tokenizer=tok, calibration=args.calib, progress=False)
    seconds = time.time() - t0
    ppl = perplexity(model, tok, load_text(SHARED / "data" / "wikitext2-raw-test.txt"), seq_len=512,
                     max_tokens=20000, progress=False).ppl
    row = {"tag": args.tag, "config": (cfg if args.iterative_steps > 1 else result.config).to_dict(),
           **({"iterative_steps": args.iterative_steps} if args.iterative_steps > 1 else {}),
           "calib": Path(args.calib).name,
           "block_removed": round(1 - block_parameters(model) / before, 4), "ppl": round(ppl, 2),
           "seconds": round(seconds), "threads": args.threads, "widths": widths_by_kind(model)}
    print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
