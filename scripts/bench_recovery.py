#!/usr/bin/env python
"""What recovery training wins back on the reference model, at the same training-token budget per row.

For 25%, 50% and 75% of decoder-block parameters removed (heads + FFN): one-shot pruning (wanda,
``--reconstruct``, ``error`` allocation: the best one-shot setting in BENCHMARKS.md), then

- ``+LoRA``: ``llmprune recover`` defaults (LoRA r=64 on every block Linear, 300 steps of 8 x 256 tokens);
- ``+LoRA+KD``: the same with distillation from the dense model (alpha 0.5, T 2);
- ``+full FT`` (only when asked with ``--rows full``): the one-shot model fully fine-tuned (lr 5e-4), the
  like-for-like baseline for one-cycle;
- ``iterative``: 3 pruning steps with 100 recovery steps after each of the first two and 100 after the last
  (300 steps in all);
- at 50% also the plain one-shot wanda (uniform, no refit: the issue's 1019 baseline) and its ``+LoRA``;
- ``one-cycle`` (only when asked with ``--rows``): OCSPruner, the structure chosen during 300 steps of full
  fine-tuning from the dense model, committed when stable, training continued (``llmprune.training.one_cycle``
  defaults: wanda score on recent training batches, global threshold under the per-layer cap, refit at the
  commit); ``one-cycle-uniform``: the same fraction from every layer; ``one-cycle-paper``: the paper's
  group-norm score and a plain cut (global);
- ``scratch``: the same shape, randomly initialised, fully trained for the same 300 steps (Minitron's question).

Every trained row sees 300 x 8 x 256 = 614,400 tokens of ``reference-train.txt`` (its held-out tail excluded).
Perplexity: WikiText-2 raw test, first 60k tokens, 256-token windows (tail dropped). Writes
``OUT/results.json``, ``OUT/results.md`` and ``OUT/ppl_vs_kept.png``.

    python scripts/bench_recovery.py --out bench/recovery
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: one-cycle rows (asked for with ``--rows``): the defaults, the uniform allocation (a standard checkpoint), and
#: the paper's own choices (group-norm score, no refit at the commit)
ONE_CYCLE_ROWS = {"one-cycle": {}, "one-cycle-uniform": {"allocation": "uniform"},
                  "one-cycle-paper": {"method": "magnitude", "refit": False}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama-7m"))
    ap.add_argument("--data", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--ppl", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--rows", default="oneshot,plain,lora,lora+kd,iterative,scratch")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="bench/recovery")
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        _write(saved["rows"], saved["machine"], out, args)
        return 0

    import torch

    from llmprune import PruneConfig, load_model, prune
    from llmprune.cli.table import block_parameters
    from llmprune.eval.perplexity import load_text, perplexity
    from llmprune.training.iterative import prune_iteratively
    from llmprune.training.recover import RecoveryConfig, recover

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # taskset pins a benchmark next to other work
    dense, tok = load_model(args.model)
    dense.eval()
    text = load_text(args.ppl)

    def ppl(m) -> float:
        return perplexity(m, tok, text, seq_len=256, max_tokens=60000, progress=False).ppl

    dense_block = block_parameters(dense)
    from _machine import cpu_name

    machine = f"{cpu_name()}, {torch.get_num_threads()} of {os.cpu_count()} cores, torch {torch.__version__}"
    rows = [{"row": "dense", "ratio": 0.0, "kept": 1.0, "ppl": ppl(dense), "seconds": 0.0, "tokens": 0}]
    budget = RecoveryConfig(steps=args.steps)
    tokens = args.steps * budget.batch_size * budget.seq_len
    wanted = args.rows.split(",")

    def record(name: str, ratio: float, model, seconds: float, used: int) -> None:
        rows.append({"row": name, "ratio": ratio, "kept": block_parameters(model) / dense_block, "ppl": ppl(model),
                     "seconds": round(seconds, 1), "tokens": used})
        print(f"{ratio:.0%} {name:<12} ppl {rows[-1]['ppl']:.2f} kept {rows[-1]['kept']:.3f} {seconds:.0f}s", flush=True)
        (out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))

    for ratio in [float(r) for r in args.ratios.split(",")]:
        cfg = PruneConfig(heads=ratio, ffn=ratio, method="wanda", reconstruct=True, allocation="error", n_samples=64)
        oneshot = copy.deepcopy(dense)
        t0 = time.perf_counter()
        prune(oneshot, cfg, tokenizer=tok, calibration=args.data, progress=False)
        t_prune = time.perf_counter() - t0
        if "oneshot" in wanted:
            record("one-shot", ratio, oneshot, t_prune, 0)
        if "plain" in wanted and ratio == 0.5:  # the baseline: one-shot wanda, uniform, no refit
            plain = copy.deepcopy(dense)
            t0 = time.perf_counter()
            prune(plain, PruneConfig(heads=ratio, ffn=ratio, method="wanda", n_samples=64), tokenizer=tok,
                  calibration=args.data, progress=False)
            record("wanda one-shot", ratio, plain, time.perf_counter() - t0, 0)
            t0 = time.perf_counter()
            res = recover(plain, RecoveryConfig(steps=args.steps), data=args.data, tokenizer=tok, progress=False)
            record("wanda +LoRA", ratio, res.model, time.perf_counter() - t0, res.tokens)
        for name, teacher in (("lora", None), ("lora+kd", dense)):
            if name in wanted:
                model = copy.deepcopy(oneshot)
                t0 = time.perf_counter()
                res = recover(model, RecoveryConfig(steps=args.steps), data=args.data, tokenizer=tok, teacher=teacher,
                              progress=False)
                record("+LoRA" if teacher is None else "+LoRA+KD", ratio, res.model, t_prune + time.perf_counter() - t0,
                       res.tokens)
        if "full" in wanted:  # prune-then-recover with full fine-tuning: one-cycle's like-for-like baseline
            model = copy.deepcopy(oneshot)
            t0 = time.perf_counter()
            res = recover(model, RecoveryConfig(steps=args.steps, full=True, lr=5e-4), data=args.data, tokenizer=tok,
                          progress=False)
            record("+full FT", ratio, res.model, t_prune + time.perf_counter() - t0, res.tokens)
        if "iterative" in wanted:
            model = copy.deepcopy(dense)
            third = RecoveryConfig(steps=args.steps // 3)
            t0 = time.perf_counter()
            it = prune_iteratively(model, cfg, steps=3, recovery=third, data=args.data, tokenizer=tok,
                                   calibration=args.data, progress=False)
            res = recover(it.model, third, data=args.data, tokenizer=tok, progress=False)
            used = sum(r.tokens for r in it.recoveries) + res.tokens
            record("iterative", ratio, res.model, time.perf_counter() - t0, used)
        for name, overrides in ONE_CYCLE_ROWS.items():  # structure chosen during full fine-tuning, same budget
            if name not in wanted:
                continue
            from llmprune.training.one_cycle import OneCycle, OneCycleConfig

            model = copy.deepcopy(dense)
            callback = OneCycle(model, OneCycleConfig(heads=ratio, ffn=ratio, **overrides), total_steps=args.steps)
            t0 = time.perf_counter()
            res = recover(model, RecoveryConfig(steps=args.steps, full=True, lr=5e-4), data=args.data, tokenizer=tok,
                          progress=False, callback=callback)
            record(f"{name} (commit @{callback.committed_at})", ratio, res.model, time.perf_counter() - t0,
                   res.tokens)
            rows[-1].update(stability=[round(x, 5) for x in callback.stability], committed_at=callback.committed_at,
                            penalty_from=callback.penalty_from, one_cycle=callback.config.to_dict())
            (out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
            callback.plot(str(out / f"stability_{name}_{round(ratio * 100)}.png"))
        if "scratch" in wanted:
            model = type(oneshot)(oneshot.config)  # the pruned shape, random weights
            model.eval()
            t0 = time.perf_counter()
            res = recover(model, RecoveryConfig(steps=args.steps, full=True, lr=2e-3, warmup_steps=30), data=args.data,
                          tokenizer=tok, progress=False)
            record("scratch", ratio, res.model, time.perf_counter() - t0, res.tokens)
    _write(rows, machine, out, args)
    print((out / "results.md").read_text())
    print(f"training budget per trained row: {tokens:,} tokens")
    return 0


def _write(rows: list[dict], machine: str, out: Path, args: argparse.Namespace) -> None:
    dense = rows[0]["ppl"]
    lines = [f"ref-llama-7m; {machine}; dense PPL {dense:.2f}; every trained row {args.steps} steps x 8 x 256 tokens.",
             "", "| removed | row | kept | PPL | recovered of one-shot increase | time (s) | training tokens |",
             "|---|---|---|---|---|---|---|"]
    oneshot = {r["ratio"]: r["ppl"] for r in rows if r["row"] == "one-shot"}
    plain = {r["ratio"]: r["ppl"] for r in rows if r["row"] == "wanda one-shot"}
    for r in rows[1:]:
        base = (plain if r["row"].startswith("wanda") else oneshot).get(r["ratio"])
        won = (f"{(base - r['ppl']) / (base - dense):.1%}" if base and "one-shot" not in r["row"] and base > dense
               else "–")
        lines.append(f"| {r['ratio']:.0%} | {r['row']} | {r['kept']:.3f} | {r['ppl']:.2f} | {won} | {r['seconds']} | "
                     f"{r['tokens']:,} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["row"] for r in rows[1:]):
        pts = sorted((r["kept"], r["ppl"]) for r in rows if r["row"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.axhline(dense, color="black", ls=":", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of decoder-block parameters kept")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(f"ref-llama-7m: recovery at {args.steps} x 8 x 256 tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_kept.png", dpi=130)


if __name__ == "__main__":
    raise SystemExit(main())
