"""Per-layer sensitivity of a real model to structured removal, and its attention sinks (issue 23 ablation).

For every decoder layer alone, with no refit: remove each KV group (its query heads' o_proj columns zeroed,
which is what removing the group does to the output), and remove a third of the FFN neurons (the lowest
``||x_j|| * ||W_down[:, j]||``, Wanda-style, from calibration activations); measure the perplexity on held-out
windows. Also the attention-sink mass of every head (mean attention of queries t >= 1 to position 0, eager
attention) and the calibration-free cost ranking of the library's Fisher allocation can be compared with it.

    python scripts/research/layer_sensitivity.py --out bench/real_structured/sensitivity.json

Masking by hooks is exact for "remove and do not refit" (tests/masking.py checks the same identity for the
library's surgery), so no model copy is made per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))


@torch.no_grad()
def nll(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for w in windows:
        out = model(w[None], labels=w[None])
        total += float(out.loss) * (w.numel() - 1)
        count += w.numel() - 1
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: scripts/real_model.py's SmolLM2)")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--ffn-fraction", type=float, default=1 / 3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/real_structured/sensitivity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmprune import load_model
    from llmprune.arch import get_adapter
    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text

    if args.model is None:
        from real_model import real_model_path
        args.model = str(real_model_path())
    model, tok = load_model(args.model)
    model.eval()
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    text = (SHARED / "data" / "wikitext2-raw-test.txt").read_text()
    ids = tok(text[:200_000], add_special_tokens=False)["input_ids"]
    n = args.eval_windows * args.seq_len
    evalw = torch.tensor(ids[:n]).reshape(args.eval_windows, args.seq_len)
    calib = torch.cat(calibration_batches(tok, read_calibration_text(str(SHARED / "data" / "reference-train.txt")),
                                          args.calib_windows, args.seq_len, 0))

    # calibration activation norms of every down_proj input (Wanda's ||x_j||)
    norms = {}
    hooks = []
    for i, layer in enumerate(layers):
        ffn = adapter.ffn(layer)
        norms[i] = torch.zeros(ffn.num_neurons, dtype=torch.float64)

        def rec(m, a, i=i):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
            norms[i] += (x * x).sum(0)
        hooks.append(ffn.output.module.register_forward_pre_hook(rec))
    with torch.no_grad():
        for w in calib:
            model(w[None])
    for h in hooks:
        h.remove()

    # attention sinks (eager attention returns the probabilities)
    model.config._attn_implementation = "eager"
    for layer in layers:
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "config"):
            layer.self_attn.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(evalw[:2], output_attentions=True).attentions
    sinks = [a[:, :, 1:, 0].mean(dim=(0, 2)).tolist() for a in att]  # [heads] per layer
    model.config._attn_implementation = "sdpa"

    t0 = time.time()
    base = nll(model, evalw)
    rows = []
    for i, layer in enumerate(layers):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        row = {"layer": i, "sink_max": max(sinks[i]), "sink_per_head": sinks[i], "group_ppl": []}
        gs = attn.group_size
        for g in range(attn.num_kv_heads):
            cols = attn.output.indices(list(range(g * gs, (g + 1) * gs)))
            mask = torch.ones(attn.output.module.in_features)
            mask[cols] = 0
            h = attn.output.module.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,))
            row["group_ppl"].append(math.exp(nll(model, evalw)))
            h.remove()
        w = ffn.output.module.weight.detach().double()
        score = norms[i].sqrt() * w.norm(dim=0)
        drop = torch.topk(score, int(round(args.ffn_fraction * ffn.num_neurons)), largest=False).indices
        mask = torch.ones(ffn.num_neurons)
        mask[drop] = 0
        h = ffn.output.module.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,))
        row["ffn_ppl"] = math.exp(nll(model, evalw))
        h.remove()
        rows.append(row)
        print(f"layer {i:2d}: groups {[round(p, 2) for p in row['group_ppl']]}  ffn-{args.ffn_fraction:.0%} "
              f"{row['ffn_ppl']:.2f}  max sink {row['sink_max']:.2f}", flush=True)
    out = {"model": args.model, "dense_ppl": math.exp(base), "eval_tokens": n, "seq_len": args.seq_len,
           "ffn_fraction": args.ffn_fraction, "seconds": round(time.time() - t0), "layers": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"dense {math.exp(base):.2f} on {n} tokens; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
