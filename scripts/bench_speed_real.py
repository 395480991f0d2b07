"""Prefill and decode tokens/s of the dense real model and of structured outputs' *shapes*, in one process on
one machine (issue 23: dense and pruned speed measured side by side).

CPU speed depends on the tensor shapes, not on the weights' values, so each pruned row is measured on the
dense model cut (``llmprune.structured.apply.apply_plan``) to the per-layer widths that row recorded: the
``widths`` of ``bench/real_structured/ablations.jsonl`` lines (heads and FFN neurons per layer) and of
``bench/real_quality/results.json`` structured rows. Rows are measured one after the other, each at
batch 1 with a 128-token prompt and 32 new tokens (median of ``--repeats``), on ``--threads`` threads.

    python scripts/bench_speed_real.py [--tags base-64x1024,ffn-only-64x1024,depth-7] [--threads 1]
        [--out bench/real_speed/results.json]

Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def _plan_for(model, widths: dict):
    """A plan keeping the first heads of every KV group and the first FFN neurons to match ``widths``
    (removed layers are those missing from the list: depth rows keep fewer layers)."""
    from llmprune.arch import get_adapter
    from llmprune.core.config import LayerPlan, PrunePlan

    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    heads, neurons = widths["heads"], widths["neurons"]
    removed = list(range(len(heads), len(layers)))  # shape-only: which layers go does not change speed
    plan = PrunePlan(layers=[LayerPlan() for _ in layers], removed_layers=removed)
    for i, (h, n) in enumerate(zip(heads, neurons)):
        attn, ffn = adapter.attention(layers[i]), adapter.ffn(layers[i])
        lp = plan.layers[i]
        if h < attn.num_heads:
            groups, gs = attn.num_kv_heads, attn.group_size
            per = h // groups
            if per >= 1 and per * groups == h:  # query heads: the same number in every group
                lp.kept_heads = [g * gs + k for g in range(groups) for k in range(per)]
                lp.kept_kv_heads = list(range(groups))
            else:  # whole KV groups
                kept_groups = h // gs
                lp.kept_kv_heads = list(range(kept_groups))
                lp.kept_heads = list(range(kept_groups * gs))
        if n < ffn.num_neurons:
            lp.kept_neurons = list(range(n))
    return plan


def _measure(model, tok, repeats: int) -> dict:
    import torch

    from llmprune.eval.efficiency import measure_speed
    from llmprune.structured.pipeline import count_parameters

    with torch.no_grad():
        sp = measure_speed(model, tok, prompt_len=128, new_tokens=32, batch_sizes=(1,), warmup=1, repeats=repeats)
    b = sp["batches"][1]
    return {"params": count_parameters(model), "prefill_tokens_per_s": round(b["prefill_tokens_per_s"], 1),
            "decode_tokens_per_s": round(b["decode_tokens_per_s"], 2)}


def _sources(tags: list[str] | None) -> list[tuple[str, dict, str]]:
    """(label, widths, source) of every row that recorded widths, ablation lines filtered by ``tags``."""
    out = []
    abl = REPO / "bench" / "real_structured" / "ablations.jsonl"
    if abl.exists():
        for line in abl.read_text().splitlines():
            r = json.loads(line)
            if "widths" in r and (tags is None or r["tag"] in tags):
                out.append((r["tag"], r["widths"], f"ablations.jsonl: PPL {r['ppl']}, "
                                                   f"{r['block_removed']:.1%} of block params removed"))
    res = REPO / "bench" / "real_quality" / "results.json"
    if res.exists():
        for r in json.loads(res.read_text())["rows"]:
            if r.get("kind") == "structured" and "widths" in r:
                out.append((r["label"], r["widths"], f"results.json: PPL {r['ppl']:.2f}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="dense model folder (default: scripts/real_model.py's)")
    ap.add_argument("--tags", default=None, help="comma-separated ablation tags (default: every row with widths)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "real_speed" / "results.json"))
    args = ap.parse_args()

    import torch

    import llmprune
    from llmprune.structured.apply import apply_plan
    from llmprune.arch.surgery import widths_by_kind

    torch.set_num_threads(args.threads)
    if args.model is None:
        from real_model import real_model_path
        args.model = str(real_model_path())
    dense, tok = llmprune.load_model(args.model)
    dense.eval()
    rows = [{"label": "dense", "source": "the dense model", **_measure(dense, tok, args.repeats)}]
    print(rows[-1], flush=True)
    for label, widths, source in _sources(args.tags.split(",") if args.tags else None):
        model = copy.deepcopy(dense)
        apply_plan(model, _plan_for(model, widths))
        if widths_by_kind(model) != {k: widths[k] for k in ("heads", "neurons")}:
            raise SystemExit(f"{label}: the cut model's widths differ from the recorded ones")
        rows.append({"label": label, "source": source, **_measure(model, tok, args.repeats)})
        print(rows[-1], flush=True)
        del model
    from _machine import cpu_name

    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores",
              "threads": args.threads, "prompt_len": 128, "new_tokens": 32, "batch": 1, "repeats": args.repeats,
              "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)  # atomic
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
