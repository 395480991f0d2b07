"""Perplexity of model folders for BENCHMARKS.md "Hidden-dimension pruning (issue 20)".

WikiText-2 raw test, first 20k tokens, 512-token windows (the protocol of the SmolLM2 section). One thread.

    python scripts/bench_hidden_ppl.py OUT.json FOLDER [FOLDER ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-raw-test.txt"


def main(out: str, folders: list[str]) -> None:
    import llmprune  # registers the per-layer classes
    from llmprune.eval import perplexity

    torch.set_num_threads(1)
    text = TEXT.read_text()
    results = json.loads(Path(out).read_text()) if Path(out).exists() else {}
    for folder in folders:
        t0 = time.perf_counter()
        model, tok = llmprune.load_model(folder)
        r = perplexity(model.eval(), tok, text, seq_len=512, max_tokens=20_000, progress=False)
        results[folder] = {"ppl": r.ppl, "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                           "hidden_size": model.config.hidden_size, "seconds": time.perf_counter() - t0}
        print(folder, results[folder], flush=True)
        Path(out).write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
