#!/usr/bin/env python
"""Peak memory of the ``taylor`` statistics pass vs a plain backward that keeps every gradient, on a random
Llama of about 0.47B parameters (hidden 1024, 24 layers, 16 query / 4 KV heads, SwiGLU 4096, vocab 32k).

Each mode runs in its own process; reported: peak RSS (VmHWM, reset after the model is built, so neither the
model nor its construction's temporaries count) above the RSS right after building the model, one decoder layer's weights + gradients (fp32) for scale, and wall time. Modes:
``activations`` (a backward where only the inputs need gradients: the activations alone), ``taylor``
(:func:`llmprune.calibration.gradients.taylor_statistics`) and ``plain-backward`` (every ``.grad`` kept).

    python scripts/bench_taylor_memory.py --out bench/taylor_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
              tie_word_embeddings=False)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM), so model construction's temporaries do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(mode: str, tokens: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprune.arch import get_adapter
    from llmprune.calibration.gradients import taylor_statistics

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    ids = torch.randint(0, CONFIG["vocab_size"], (2, tokens // 2))
    import gc

    gc.collect()
    _reset_peak()
    base = _rss_mb()
    t0 = time.perf_counter()
    if mode == "taylor":
        taylor_statistics(model, get_adapter(model), [ids])
    elif mode == "activations":  # the backward's own activations: inputs need grad, no parameter does
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1].float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    else:  # what a plain implementation does: one backward, every .grad kept until scored
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        _ = [(p.detach() * p.grad).abs().sum() for p in model.parameters() if p.grad is not None]
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")  # peak since _reset_peak()
    return {"mode": mode, "params": params, "layer_params": layer, "tokens": tokens, "seconds": round(seconds, 1),
            "extra_peak_mb": round(peak - base, 1), "layer_weights_and_grads_mb": round(2 * layer * 4 / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default="bench/taylor_memory.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.tokens)), flush=True)
        return 0
    rows = []
    for mode in ("activations", "taylor", "plain-backward"):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        rows.append(json.loads(line[7:]) if line else {"mode": mode, "error": proc.stderr[-1500:]})
        print(rows[-1], flush=True)
    acts = next((r["extra_peak_mb"] for r in rows if r["mode"] == "activations" and "error" not in r), None)
    tay = next((r for r in rows if r["mode"] == "taylor" and "error" not in r), None)
    if acts is not None and tay is not None:
        bound = 1.5 * (tay["layer_weights_and_grads_mb"] + acts)
        print(f"taylor extra peak {tay['extra_peak_mb']} MB vs bound 1.5 x (one layer's weights+grads "
              f"{tay['layer_weights_and_grads_mb']} MB + activations {acts} MB) = {bound:.1f} MB")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
