#!/usr/bin/env python
"""SparseGPT solve and TEAL threshold calibration on the reference model: the former implementations
(kept verbatim in ``tests/sparsegpt_reference.py`` and ``tests/teal_reference.py``) against the current
ones, timed in the same process, interleaved old/new, with the results compared.

SparseGPT: "solve" is the time inside ``sparsegpt_prune`` (Hessian factorisation included) for all 7
linears x 6 layers, on the real calibration Hessians of the dense model (128 x 256 tokens); settings 50%
and 70% unstructured and 2:4. Compared per linear: exact sparsity, mask agreement, reconstruction error
``tr((W - W') H (W - W')^T)`` (``||W X - W' X||^2`` up to 2/N) of new over old.

TEAL: ``calibrate_activation_thresholds`` on 128 x 256 tokens at sparsity 0.4 and 0.5, ``sequential``
True and False; compared per layer: relative threshold difference.

    PYTHONPATH=$PWD LLMPRUNE_SHARED=/work/shared HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        python scripts/bench_calib_speed.py --out bench/calib_speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the verbatim former implementations

import sparsegpt_reference  # noqa: E402
import teal_reference  # noqa: E402

from llmprune.arch import get_adapter  # noqa: E402
from llmprune.arch.base import weight_matrix  # noqa: E402
from llmprune.calibration.calibrate import calibration_batches, layerwise_statistics, read_calibration_text  # noqa: E402
from llmprune.sparsity import calibrate_activation_thresholds  # noqa: E402
from llmprune.sparsity.sparsegpt import sparsegpt_prune_group  # noqa: E402

SHARED = Path(os.environ.get("LLMPRUNE_SHARED", "/work/shared"))
SGPT_SETTINGS = {"unstructured 50%": (0.5, None), "unstructured 70%": (0.7, None), "2:4": (0.5, (2, 4))}


def machine() -> dict:
    from _machine import cpu_name

    cpu = cpu_name()
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def hessians(model, batches) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, weight, H)`` of every linear in the decoder layers, H from the dense model's inputs."""
    names = {id(m): n for n, m in model.named_modules()}
    linears = lambda layer: [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    stats = layerwise_statistics(model, get_adapter(model), batches, progress=False, grams_of=linears)
    return [(names[id(m)], weight_matrix(m).detach().clone(), g.hessian())
            for st in stats for m, g in st.grams.items()]


def recon_error(w: torch.Tensor, new_w: torch.Tensor, H: torch.Tensor) -> float:
    D = w.double() - new_w.double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def solve_groups(layers) -> list[list[int]]:
    """Indices of the linears the pipeline solves together: same decoder layer and the same Hessian (they
    read one input: q/k/v, gate/up); ``sparsify`` gathers one statistic per input and makes one call."""
    groups: list[list[int]] = []
    for i, (name, _, H) in enumerate(layers):
        last = groups[-1][0] if groups else None
        if last is not None and layers[last][0].rsplit(".", 2)[0] == name.rsplit(".", 2)[0] \
                and torch.equal(layers[last][2], H):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def time_solves(layers, groups, sparsity, nm, new_first: bool) -> tuple[dict, dict, list, list]:
    """Old (one ``sparsegpt_reference.sparsegpt_prune`` per linear) and new (one ``sparsegpt_prune_group``
    per input, as the pipeline calls it) alternating per group, so both see the same machine load.
    Returns wall and CPU (process) seconds of each and the per-linear results."""
    def old(group):
        return [sparsegpt_reference.sparsegpt_prune(layers[i][1], layers[i][2], sparsity, nm=nm) for i in group]

    def new(group):
        return sparsegpt_prune_group([layers[i][1] for i in group], layers[group[0]][2], sparsity, nm=nm)

    impls = [("old", old), ("new", new)]
    if new_first:
        impls.reverse()
    wall = {"old": 0.0, "new": 0.0}
    cpu = {"old": 0.0, "new": 0.0}
    results: dict[str, list] = {"old": [], "new": []}
    for group in groups:
        for key, solve in impls:
            t, c = time.perf_counter(), time.process_time()
            res = solve(group)
            wall[key] += time.perf_counter() - t
            cpu[key] += time.process_time() - c
            results[key] += res
    return wall, cpu, results["old"], results["new"]


def bench_sparsegpt(layers, repeats: int, threads: list[int]) -> dict:
    groups = solve_groups(layers)
    result = {}
    for label, (sparsity, nm) in SGPT_SETTINGS.items():
        entry: dict = {"sparsity": sparsity, "nm": nm, "seconds": {}, "solves": {"old": len(layers), "new": len(groups)}}
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            old_s, new_s, old_c, new_c = [], [], [], []
            for r in range(repeats):
                wall, cpu, old, new = time_solves(layers, groups, sparsity, nm, new_first=bool(r % 2))
                old_s.append(wall["old"])
                new_s.append(wall["new"])
                old_c.append(cpu["old"])
                new_c.append(cpu["new"])
            ratios = [o / n for o, n in zip(old_s, new_s)]
            cpu_ratios = [o / n for o, n in zip(old_c, new_c)]
            entry["seconds"][f"{n_threads} threads"] = {
                "old": old_s, "new": new_s, "old_median": statistics.median(old_s),
                "new_median": statistics.median(new_s), "speedup_per_repeat": ratios,
                "speedup": statistics.median(ratios), "old_cpu": old_c, "new_cpu": new_c,
                "old_cpu_median": statistics.median(old_c), "new_cpu_median": statistics.median(new_c),
                "cpu_speedup_per_repeat": cpu_ratios, "cpu_speedup": statistics.median(cpu_ratios)}
            print(f"sparsegpt {label:17s} {n_threads} threads: old {statistics.median(old_s):7.2f}s  "
                  f"new {statistics.median(new_s):6.2f}s  x{statistics.median(ratios):.1f} "
                  f"(per repeat {', '.join(f'{x:.1f}' for x in ratios)}); CPU time x{statistics.median(cpu_ratios):.1f}",
                  flush=True)
        per_layer = {}
        for (name, w, H), (ow, ok), (nw, nk) in zip(layers, old, new):
            per_layer[name] = {"same_sparsity": int((~ok).sum()) == int((~nk).sum()),
                               "mask_agreement": float((ok == nk).float().mean()),
                               "error_ratio": recon_error(w, nw, H) / recon_error(w, ow, H)}
        entry["per_layer"] = per_layer
        entry["all_same_sparsity"] = all(v["same_sparsity"] for v in per_layer.values())
        entry["min_mask_agreement"] = min(v["mask_agreement"] for v in per_layer.values())
        entry["error_ratio_min"] = min(v["error_ratio"] for v in per_layer.values())
        entry["error_ratio_max"] = max(v["error_ratio"] for v in per_layer.values())
        result[label] = entry
    return result


def bench_teal(model, batches, sparsities: list[float], threads: int) -> dict:
    torch.set_num_threads(threads)
    result = {}
    for sequential in (True, False):
        for s in sparsities:  # A/B per setting; the two sparsities make A/B/A/B per mode
            kw = dict(calibration=batches, sparsity=s, sequential=sequential, progress=False)
            load = [load_avg()]
            t = time.perf_counter()
            old = teal_reference.calibrate_activation_thresholds(model, **kw)
            t_old = time.perf_counter() - t
            t = time.perf_counter()
            new = calibrate_activation_thresholds(model, **kw)
            t_new = time.perf_counter() - t
            load.append(load_avg())
            rel = {k: abs(new[k] - old[k]) / abs(old[k]) if old[k] else abs(new[k]) for k in old}
            label = f"sequential={sequential} sparsity={s}"
            result[label] = {"sequential": sequential, "sparsity": s, "old_seconds": t_old, "new_seconds": t_new,
                             "speedup": t_old / t_new, "threshold_rel_diff_max": max(rel.values()),
                             "threshold_rel_diff_median": statistics.median(rel.values()),
                             "load_avg_before_after": load, "thresholds_old": old, "thresholds_new": new}
            print(f"teal {label}: old {t_old:7.1f}s  new {t_new:6.1f}s  x{t_old / t_new:.1f}  "
                  f"max rel diff {max(rel.values()):.4f}", flush=True)
    return result


def write_markdown(path: Path, res: dict) -> None:
    lines = ["# Calibration speed: SparseGPT solve and TEAL thresholds, former vs current", "",
             f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores), torch {res['machine']['torch']}, "
             f"{res['threads']} torch threads; load average at start {res['load_avg_start']}, "
             f"end {res['load_avg_end']} (another benchmark ran alongside: timings are noisy, old and new "
             "alternate in one process).", "", f"Command: `{res['command']}`", ""]
    if "sparsegpt" in res:
        lines += [f"## SparseGPT solve (all 42 linears, real calibration Hessians, {res['tokens']} tokens)", "",
                  f"{res['sgpt_repeats']} repeats. Old: the former `sparsegpt_prune` once per linear (42 "
                  "solves); new: `sparsegpt_prune_group` once per distinct input, as `sparsify` calls it (q/k/v "
                  "and gate/up together: 24 solves); the two alternate group by group (which goes first "
                  "alternates between repeats), on the same Hessians. Seconds: median over repeats of the "
                  "whole solve work (Hessian factorisation included; the Hessians themselves are given); "
                  "speedup: median of the per-repeat ratios (range in brackets). CPU: the same for process "
                  "CPU time, which leaves out time slices lost to other processes on the core. Correctness "
                  "per linear against the old result.", "",
                  "| setting | threads | old (s) | new (s) | speedup | old CPU (s) | new CPU (s) | CPU speedup "
                  "| same sparsity | min mask agreement | error ratio new/old (min..max) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, e in res["sparsegpt"].items():
            for th, t in e["seconds"].items():
                lines.append(f"| {label} | {th.split()[0]} | {t['old_median']:.2f} | {t['new_median']:.2f} | "
                             f"{t['speedup']:.1f}x ({min(t['speedup_per_repeat']):.1f}-"
                             f"{max(t['speedup_per_repeat']):.1f}) | {t['old_cpu_median']:.2f} | "
                             f"{t['new_cpu_median']:.2f} | {t['cpu_speedup']:.1f}x "
                             f"({min(t['cpu_speedup_per_repeat']):.1f}-{max(t['cpu_speedup_per_repeat']):.1f}) | "
                             f"{e['all_same_sparsity']} | "
                             f"{e['min_mask_agreement']:.6f} | "
                             f"{e['error_ratio_min']:.6f}..{e['error_ratio_max']:.6f} |")
        lines.append("")
    if "teal" in res:
        lines += [f"## TEAL threshold calibration ({res['tokens']} tokens, 42 thresholds)", "",
                  "One old/new pair per row (old first, in one process); the sequential=True rows ran first.", "",
                  "| sequential | sparsity | old (s) | new (s) | speedup | max rel. threshold diff "
                  "| median rel. diff |", "|---|---|---|---|---|---|---|"]
        for e in res["teal"].values():
            lines.append(f"| {e['sequential']} | {e['sparsity']} | {e['old_seconds']:.1f} | {e['new_seconds']:.1f} | "
                         f"{e['speedup']:.1f}x | {e['threshold_rel_diff_max']:.4f} | "
                         f"{e['threshold_rel_diff_median']:.4f} |")
        for mode in (True, False):
            sp = [e["speedup"] for e in res["teal"].values() if e["sequential"] == mode]
            lines.append(f"\nsequential={mode}: median speedup {statistics.median(sp):.1f}x")
        lines.append("")
    for part, command in res.get("carried_over", {}).items():
        lines.insert(lines.index(next(x for x in lines if x.startswith(f"## {'TEAL' if part == 'teal' else 'SparseGPT'}"))) + 1,
                     f"\n*Not re-run in this session: the measurement of an earlier run (`{command}`), "
                     "whose load and threads are those of that run (the code measured is unchanged).*")
    lines += ["## Notes", "",
              "- With the cores loaded by other work, every PyTorch/MKL call that opens a thread-pool region waits "
              "for a time slice (milliseconds), so 2-thread timings count such calls more than arithmetic and "
              "vary from run to run; the 1-thread rows show the algorithmic ratio.",
              "- TEAL: both versions run the decoder layers themselves; the new one runs each layer once per batch "
              "(sequential=True: every batch's forward paused at each target until its threshold is known) and "
              "stops capturing layer inputs before the LM head. That forward compute is the floor of the new "
              "timings.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama-7m"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sgpt-threads", default="2,1", help="thread counts for the SparseGPT timings")
    ap.add_argument("--sgpt-repeats", type=int, default=5)
    ap.add_argument("--teal-sparsities", default="0.4,0.5")
    ap.add_argument("--parts", default="sparsegpt,teal")
    ap.add_argument("--out", default=str(ROOT / "bench" / "calib_speed"))
    ap.add_argument("--markdown-only", action="store_true", help="re-render results.md from results.json")
    args = ap.parse_args()
    if args.markdown_only:
        out = Path(args.out)
        write_markdown(out / "results.md", json.loads((out / "results.json").read_text()))
        return
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_kernels=False,
                                                 trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    batches = calibration_batches(tok, read_calibration_text(args.calib), args.n_samples, args.seq_len, seed=0)
    parts = args.parts.split(",")
    res: dict = {"machine": machine(), "threads": args.threads, "load_avg_start": load_avg(),
                 "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
                 "tokens": f"{args.n_samples} x {args.seq_len}"}
    if "sparsegpt" in parts:
        layers = hessians(model, batches)
        res["sgpt_repeats"] = args.sgpt_repeats
        res["sparsegpt"] = bench_sparsegpt(layers, args.sgpt_repeats, [int(t) for t in args.sgpt_threads.split(",")])
        torch.set_num_threads(args.threads)
    if "teal" in parts:
        res["teal"] = bench_teal(model, batches, [float(s) for s in args.teal_sparsities.split(",")], args.threads)
    res["load_avg_end"] = load_avg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    if previous.exists():  # a part not re-run keeps its former measurement, marked as such
        before = json.loads(previous.read_text())
        for part in ("sparsegpt", "teal"):
            if part not in res and part in before:
                res[part] = before[part]
                if part == "sparsegpt":
                    res["sgpt_repeats"] = before.get("sgpt_repeats")
                res.setdefault("carried_over", {})[part] = before.get("carried_over", {}).get(part, before["command"])
    (out / "results.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    write_markdown(out / "results.md", res)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
