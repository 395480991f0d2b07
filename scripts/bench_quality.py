#!/usr/bin/env python
"""Retraining-free quality on the reference model, with llm-compressor as a peer in the same run.

Rows (every one pruned from the dense model on the *same* calibration windows, no training):

- structured, heads + FFN removed uniformly at 25% and 50% of decoder-block parameters, per criterion, as is,
  with ``--reconstruct`` (sequential least-squares refit of o_proj/down_proj), and with ``--reconstruct`` plus
  the ``error`` allocation (per-layer widths where the reconstruction error is lowest);
- weight sparsity at 50% and 70% unstructured and 2:4, per method, plus OWL per-layer ratios at 70%;
- llm-compressor's SparseGPT and Wanda at the same settings, run by ``scripts/peer_llmcompressor.py`` in its own
  virtual environment (it pins transformers <= 5.17), created by this script when missing.

Each row runs in its own subprocess, so its wall time and peak resident memory (``ru_maxrss``, through the
pruning step, model load included) are its own. Perplexity: WikiText-2 raw test, first 60k tokens,
non-overlapping 256-token windows, the same function for every row (peer outputs are reloaded and scored here).
Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/ppl_vs_kept.png``.

    python scripts/bench_quality.py --out bench/quality --peer-venv /work/venvs/llmc
    python scripts/bench_quality.py --out /tmp/q --quick --no-peer        # a few rows, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STRUCTURED_VARIANTS = {"plain": {}, "reconstruct": {"reconstruct": True},
                       "reconstruct+error": {"reconstruct": True, "allocation": "error"}}
SPARSITY_SETTINGS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"sparsity": 0.5, "pattern": "2:4"}}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rows(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = [{"kind": "dense", "label": "dense"}]
    for ratio in args.structured_ratios:
        for method in args.structured_methods:
            for variant in args.variants:
                rows.append({"kind": "structured", "label": f"{method} {variant} {ratio:.0%}", "method": method,
                             "variant": variant, "setting": f"{ratio:.0%}",
                             "config": {"heads": ratio, "ffn": ratio, "method": method,
                                        **STRUCTURED_VARIANTS[variant]}})
    for setting in args.sparsity_settings:
        for method in args.sparsity_methods:
            rows.append({"kind": "sparsity", "label": f"{method} {setting}", "method": method, "variant": "uniform",
                         "setting": setting, "config": {"method": method, **SPARSITY_SETTINGS[setting]}})
        if setting == "70%":
            for method in args.owl_methods:
                rows.append({"kind": "sparsity", "label": f"{method} owl {setting}", "method": method,
                             "variant": "owl", "setting": setting,
                             "config": {"method": method, "allocation": "owl", **SPARSITY_SETTINGS[setting]}})
        if args.peer:
            for method in ("sparsegpt", "wanda"):
                rows.append({"kind": "peer", "label": f"llm-compressor {method} {setting}", "method": method,
                             "variant": "llm-compressor", "setting": setting,
                             "config": {"method": method, **SPARSITY_SETTINGS[setting]}})
    return rows


# ---- one row, in a child process ------------------------------------------------------------------------
def run_row(row: dict, args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    from llmprune import PruneConfig, load_model, prune
    from llmprune.cli.table import block_parameters
    from llmprune.eval.perplexity import load_text, perplexity
    from llmprune.structured.pipeline import count_parameters
    from llmprune.sparsity import SparsityConfig, sparsify

    torch.set_num_threads(args.threads)
    windows = load_file(str(Path(args.out) / "calib.safetensors"))["input_ids"]
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    dense_block = block_parameters(model)
    result: dict = {}
    if row["kind"] == "structured":
        cfg = PruneConfig(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, **row["config"])
        t0 = time.perf_counter()
        prune(model, cfg, calibration=windows, progress=False)
        result["kept"] = block_parameters(model) / dense_block
    elif row["kind"] == "sparsity":
        cfg = SparsityConfig(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, **row["config"])
        t0 = time.perf_counter()
        report = sparsify(model, cfg, calibration=windows, progress=False)
        result["kept"] = 1 - report.overall_sparsity
    elif row["kind"] == "peer":
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="llmc-")) / "model"  # scored here, then deleted
        cmd = [str(Path(args.peer_venv) / "bin" / "python"), str(REPO / "scripts" / "peer_llmcompressor.py"),
               "--model", args.model, "--calib", str(Path(args.out) / "calib.safetensors"),
               "--method", row["config"]["method"], "--sparsity", str(row["config"]["sparsity"]),
               "--pattern", row["config"].get("pattern", "unstructured"), "--out", str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        peer = json.loads((folder / "peer_result.json").read_text())
        model, tok = load_model(str(folder))
        shutil.rmtree(folder.parent, ignore_errors=True)
        zeros = total = 0
        for name, p in model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                zeros += int((p == 0).sum())
                total += p.numel()
        result.update(kept=1 - zeros / total, seconds=peer["seconds"], peak_rss_mb=peer["peak_rss_mb"])
    if "seconds" not in result:
        result["seconds"] = round(time.perf_counter() - t0, 2)
        result["peak_rss_mb"] = round(_peak_mb(), 1)
    if row["kind"] == "dense":
        result["kept"] = 1.0
    result["params"] = count_parameters(model)
    text = load_text(args.ppl)
    result["ppl"] = perplexity(model, tok, text, seq_len=args.ppl_seq_len, max_tokens=args.max_tokens,
                               progress=False).ppl
    return result


# ---- the driver ------------------------------------------------------------------------------------------
def _ensure_peer_venv(venv: Path) -> bool:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llmcompressor, transformers; print(llmcompressor.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return True
    print(f"creating llm-compressor venv in {venv} (torch==2.13.0 + llmcompressor) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "-U", "pip"],
             [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "llmcompressor"]]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            print(f"could not set up the peer venv ({' '.join(step)}); skipping llm-compressor", file=sys.stderr)
            return False
    return subprocess.run(probe, capture_output=True).returncode == 0


def _calibration(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    import torch
    from transformers import AutoTokenizer

    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text

    tok = AutoTokenizer.from_pretrained(args.model)
    batches = calibration_batches(tok, read_calibration_text(args.calib), args.n_samples, args.seq_len, args.seed)
    save_file({"input_ids": torch.cat(batches).contiguous()}, str(Path(args.out) / "calib.safetensors"))


def _markdown(results: list[dict], args: argparse.Namespace, machine: str) -> str:
    dense = next(r for r in results if r["kind"] == "dense")
    lines = [f"ref-llama-7m; calibration {args.n_samples} x {args.seq_len} tokens of {Path(args.calib).name} "
             f"(seed {args.seed}, identical windows for every row and the peer); WikiText-2 raw test, first "
             f"{args.max_tokens} tokens, {args.ppl_seq_len}-token windows; {machine}. Dense: {dense['ppl']:.2f}.", ""]
    for kind, title in (("structured", "Structured (heads + FFN, fraction of decoder-block parameters removed)"),
                        ("sparsity", "Weight sparsity (llmprune and llm-compressor, same windows)")):
        lines += [f"**{title}**", "", "| method | variant | setting | kept | PPL | time (s) | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in results:
            if r["kind"] == kind or (kind == "sparsity" and r["kind"] == "peer"):
                if "error" in r:
                    lines.append(f"| {r['method']} | {r['variant']} | {r['setting']} | – | failed | – | – |")
                    continue
                lines.append(f"| {r['method']} | {r['variant']} | {r['setting']} | {r['kept']:.3f} | "
                             f"{r['ppl']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if "error" in r or r["kind"] == "dense":
            continue
        key = f"{r['kind']}: {r['method']} {r['variant']}{' 2:4' if r['setting'] == '2:4' else ''}"
        groups.setdefault(key, []).append((r["kept"], r["ppl"]))
    for key, pts in sorted(groups.items()):
        pts.sort()
        style = "s--" if key.startswith("peer") else ("o-" if key.startswith("structured") else "^-")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key, markersize=4)
    dense = next(r for r in results if r["kind"] == "dense")
    ax.axhline(dense["ppl"], color="black", lw=0.8, ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction kept (structured: decoder-block parameters; sparsity: non-zero target weights)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title("ref-llama-7m, no training")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama-7m"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--ppl", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=60000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/quality")
    ap.add_argument("--peer-venv", default=str(REPO.parent / "venvs" / "llmc"),
                    help="virtual environment with llmcompressor (created when missing)")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip llm-compressor")
    ap.add_argument("--quick", action="store_true", help="wanda/sparsegpt only, 25% / 50% / 2:4 (smoke test)")
    ap.add_argument("--structured-methods", default=None, help="comma-separated criteria (default magnitude,wanda,flap)")
    ap.add_argument("--variants", default=None, help=f"comma-separated of {','.join(STRUCTURED_VARIANTS)}")
    ap.add_argument("--no-sparsity", action="store_true", help="structured rows only")
    ap.add_argument("--replot", action="store_true", help="rewrite results.md and the plot from OUT/results.json")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # child mode: one row as JSON
    args = ap.parse_args()
    args.structured_ratios = [0.25] if args.quick else [0.25, 0.5]
    chosen_methods, chosen_variants = args.structured_methods, args.variants
    args.structured_methods = ["wanda"] if args.quick else ["magnitude", "wanda", "flap"]
    args.variants = ["plain", "reconstruct+error"] if args.quick else list(STRUCTURED_VARIANTS)
    args.sparsity_settings = ["2:4"] if args.quick else list(SPARSITY_SETTINGS)
    args.sparsity_methods = ["sparsegpt"] if args.quick else ["magnitude", "wanda", "ria", "sparsegpt", "alps"]
    args.owl_methods = [] if args.quick else ["wanda", "sparsegpt", "alps"]
    if chosen_methods:
        args.structured_methods = chosen_methods.split(",")
    if chosen_variants:
        args.variants = chosen_variants.split(",")
    if args.no_sparsity:
        args.sparsity_settings, args.peer = [], False
    if args.run:
        print("RESULT " + json.dumps(run_row(json.loads(args.run), args)), flush=True)
        return 0

    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        (out / "results.md").write_text(_markdown(saved["rows"], args, saved["machine"]))
        _plot(saved["rows"], out / "ppl_vs_kept.png")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.peer:
        args.peer = _ensure_peer_venv(Path(args.peer_venv))
    _calibration(args)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    machine = f"{cpu}, {os.cpu_count()} cores, {args.threads} threads"
    results = []
    for row in _rows(args):
        cmd = [sys.executable, __file__, "--run", json.dumps(row)] + [a for a in sys.argv[1:] if a != "--quick"]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"error": proc.stderr[-2000:]}
        results.append({**row, **res})
        shown = f"ppl {res['ppl']:.2f}, kept {res['kept']:.3f}, {res['seconds']}s" if "ppl" in res else "FAILED"
        print(f"{row['label']:<40} {shown}", flush=True)
        (out / "results.json").write_text(json.dumps({"machine": machine, "args": {k: v for k, v in vars(args).items()
                                                                                     if k != "run"},
                                                      "rows": results}, indent=2))
    (out / "results.md").write_text(_markdown(results, args, machine))
    _plot(results, out / "ppl_vs_kept.png")
    print("\n" + _markdown(results, args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
