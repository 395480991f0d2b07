#!/usr/bin/env python
"""Peak memory and time of one SparseGPT solve: a down_proj-like ``[out, in]`` weight (default 3072 x 8192,
Llama-3.2-3B's) on a float64 Hessian of ``tokens`` random correlated inputs (fewer than ``in``: singular,
conditioned by the dampening, as with 16 x 128 calibration tokens).

Each measurement runs in its own process; the peak is VmHWM above VmRSS just before the solve (the peak is
reset through ``/proc/self/clear_refs`` first, so building H does not count).

    taskset -c 0 python scripts/bench_sgpt_solve_mem.py --save /tmp/sgpt_masks.pt
    taskset -c 0 python scripts/bench_sgpt_solve_mem.py --consume --compare /tmp/sgpt_masks.pt
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _hessian(n: int, tokens: int, g):
    import torch

    H = torch.zeros(n, n, dtype=torch.float64)
    mix = torch.randn(n, 64, generator=g, dtype=torch.float64) / 8
    for _ in range(0, tokens, 512):  # correlated inputs with heavy-tailed feature scales
        x = torch.randn(512, n, generator=g, dtype=torch.float64)
        x += torch.randn(512, 64, generator=g, dtype=torch.float64) @ mix.T
        x *= torch.logspace(-1, 1, n, dtype=torch.float64)
        H.addmm_(x.T, x, alpha=2.0 / tokens)
    return H


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nm", help="N:M pattern such as 2:4 (instead of --sparsity unstructured)")
    ap.add_argument("--consume", action="store_true", help="hand H over (overwrite_hessian=True) when supported")
    ap.add_argument("--factor-only", action="store_true", help="time the factorisation alone")
    ap.add_argument("--save", help="save the keep mask and new weight here")
    ap.add_argument("--compare", help="compare with masks saved by --save")
    args = ap.parse_args()

    import torch

    from llmprune.sparsity import sparsegpt as sg

    torch.set_num_threads(1)
    nm = tuple(int(v) for v in args.nm.split(":")) if args.nm else None
    g = torch.Generator().manual_seed(0)
    n = args.cols
    H = _hessian(n, args.tokens, g)
    w = torch.randn(args.rows, n, generator=g) * 0.02
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if args.factor_only:
        V = sg._damped_reverse_cholesky(H, 0.01, dtype=torch.float32)
        result = None
    else:
        kwargs = {}
        if args.consume and "overwrite_hessian" in inspect.signature(sg.sparsegpt_prune_group).parameters:
            kwargs["overwrite_hessian"] = True
        Hh = H
        del H  # the caller keeps no reference (as api.py once the accumulator has released it)
        result = sg.sparsegpt_prune_group([w], Hh, args.sparsity if nm is None else 1 - nm[0] / nm[1], nm=nm,
                                          **kwargs)
        del Hh
    seconds = time.perf_counter() - t0
    row = {"mode": "factor" if args.factor_only else ("solve-consume" if args.consume else "solve"),
           "rows": args.rows, "cols": n, "seconds": round(seconds, 2),
           "peak_above_start_mb": round(_status_mb("VmHWM") - before, 1), "rss_before_mb": round(before, 1)}
    if result is not None:
        (new_w, keep), = result
        if args.save:
            torch.save({"w": new_w, "keep": keep}, args.save)
        if args.compare:
            ref = torch.load(args.compare)
            row["mask_agreement"] = float((ref["keep"] == keep).double().mean())
            row["identical"] = bool(torch.equal(ref["keep"], keep) and torch.equal(ref["w"], new_w))
            row["max_weight_diff"] = float((ref["w"] - new_w).abs().max())
            H = _hessian(n, args.tokens, torch.Generator().manual_seed(0)).float()  # the same H again
            for name, other in (("error", new_w), ("error_ref", ref["w"])):
                D = w - other
                row[name] = float(((D @ H) * D).sum())
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
