#!/usr/bin/env python
"""Retraining-free quality on a real model (SmolLM2-135M-Instruct), with llm-compressor as a peer in the same run.

Every row starts from the dense model and sees the *same* calibration windows (drawn once and saved to
``OUT/calib.safetensors``; llm-compressor gets that tensor too). No training. Rows:

- ``dense``: the unpruned model;
- ``structured``: the library's default recipe run exactly as a user would, through the CLI
  ``llmprune prune MODEL --heads h --ffn f --calib TEXT --out DIR`` (no method / allocation flags), at 10, 25, 33
  and 50% of decoder-block parameters: ``h`` = the target, ``f`` solved from the model's shapes for the rest;
  the achieved fraction is read from the CLI's output;
- ``sparsity``: weight sparsity at 50% and 70% unstructured and 2:4, every ``llmprune.sparsity`` method (ALPS
  last: it is the slow one);
- ``peer``: llm-compressor's SparseGPT and Wanda at the same settings, by ``scripts/peer_llmcompressor.py`` in
  its own virtual environment (it pins transformers <= 5.17), created by this script when missing.

Per row: WikiText-2 perplexity, lm-eval accuracy on the shipped tasks (lambada, piqa, openbookqa; ``--limit``
documents each), wall time and peak RSS of the pruning step; for dense and structured rows also prefill /
decode tokens/s at batch 1 (``llmprune.eval.efficiency.measure_speed``). Each row runs in its own process
(its peak RSS is its own). The run is resumable: ``OUT/results.json`` accumulates rows (keyed by label) and a
rerun skips the rows already there (failed rows are retried), so ``--only`` can add a group later.

Presets: ``real`` (default): the cached SmolLM2 folder (``scripts/real_model.py``), calibration 64 x 512,
WikiText-2 test first 20k tokens in 512-token windows. ``ref``: the 7M reference model and its old protocol
(64 x 256 calibration, 60k tokens in 256-token windows) with the old rows (structured criteria x variants at
25/50%, OWL at 70%) besides the new ones.

    python scripts/bench_quality.py --out bench/real_quality --threads 1 --only dense,sparsity,peer
    python scripts/bench_quality.py --out bench/real_quality --threads 1 --only structured
    python scripts/bench_quality.py --preset ref --out /tmp/q --only structured --limit 20   # smoke test
    python scripts/bench_quality.py --out bench/real_quality --replot    # tables + plot from results.json

Writes ``OUT/results.json``, ``OUT/results.md``, ``OUT/ppl_vs_kept.png`` and per-row CLI logs in ``OUT/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STRUCTURED_VARIANTS = {"plain": {}, "reconstruct": {"reconstruct": True},
                       "reconstruct+error": {"reconstruct": True, "allocation": "error"}}
SPARSITY_SETTINGS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"sparsity": 0.5, "pattern": "2:4"}}
PRESETS = {
    "real": {"n_samples": 64, "seq_len": 512, "ppl_seq_len": 512, "max_tokens": 20000,
             "targets": [0.10, 0.25, 0.33, 0.50], "legacy": False},
    "ref": {"n_samples": 64, "seq_len": 256, "ppl_seq_len": 256, "max_tokens": 60000,
            "targets": [0.10, 0.25, 0.33, 0.50], "legacy": True},
}
#: run order: per method over the three settings, ours next to the peer's (SparseGPT first: the target compares
#: against it), ALPS last: 2:4, then 70%, then 50% (slowest)
SPARSITY_ORDER = (("sparsegpt", "peer:sparsegpt"), ("wanda", "peer:wanda"), ("ria",), ("magnitude",))
ALPS_ORDER = ("2:4", "70%", "50%")
#: what the tables show per task: lm-eval's acc, or acc_norm where the task defines it
TASK_METRIC = {"lambada": "acc", "piqa": "acc_norm", "openbookqa": "acc_norm"}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def default_model(preset: str) -> str:
    if preset == "ref":
        return str(SHARED / "models" / "ref-llama-7m")
    sys.path.insert(0, str(REPO / "scripts"))
    from real_model import real_model_path

    return str(real_model_path())


# ---- which (heads, ffn) give a target fraction of decoder-block parameters ------------------------------
def structured_setting(model_dir: str, target: float) -> dict:
    """``--heads`` = the target; ``--ffn`` solved so that the removed decoder-block parameters ~ the target.

    The attention unit is what ``auto`` resolves to (``resolve_attention_unit``): ``query`` removes q_proj rows
    and o_proj columns and keeps k/v, in whole multiples of the KV-group count; ``group`` removes whole KV
    groups (their k/v rows too). The head count is rounded to whole units over all layers (the fisher
    allocation spreads a total), which the solve takes into account. The achieved fraction is read from the
    CLI afterwards.
    """
    import math

    from llmprune.structured.select import resolve_attention_unit

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    qo = 2 * hidden * heads * head_dim
    kvp = 2 * hidden * kv * head_dim
    mlp = 3 * hidden * inter
    block = qo + kvp + mlp + 2 * hidden  # + the two RMSNorm weights
    unit = resolve_attention_unit(target, heads, kv)
    size = heads // kv if unit == "group" else kv  # query heads per removable unit
    total_heads = layers * heads
    heads_removed = math.floor(target * total_heads / size + 0.5) * size / total_heads
    attn = heads_removed * (qo + kvp if unit == "group" else qo)
    ffn = (target * block - attn) / mlp
    return {"heads": round(target, 3), "ffn": round(min(max(ffn, 0.0), 0.95), 3), "attention_unit": unit,
            "expected_heads_removed": round(heads_removed, 4)}


def _rows(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = [{"kind": "dense", "label": "dense", "method": "dense", "variant": "", "setting": ""}]
    for t in args.targets:
        s = structured_setting(args.model, t)
        rows.append({"kind": "structured", "label": f"structured {t:.0%}", "method": "default (CLI)",
                     "variant": "obs+fisher", "setting": f"{t:.0%}", "target": t,
                     "config": {"heads": s["heads"], "ffn": s["ffn"]}})
    if args.legacy:  # the ref model's old rows: criteria x variants, in-process
        for ratio in (0.25, 0.5):
            for method in ("magnitude", "wanda", "flap"):
                for variant in STRUCTURED_VARIANTS:
                    rows.append({"kind": "legacy", "label": f"{method} {variant} {ratio:.0%}", "method": method,
                                 "variant": variant, "setting": f"{ratio:.0%}",
                                 "config": {"heads": ratio, "ffn": ratio, "method": method,
                                            **STRUCTURED_VARIANTS[variant]}})
    for group in SPARSITY_ORDER:
        for setting in SPARSITY_SETTINGS:
            for entry in group:
                peer, method = entry.startswith("peer:"), entry.split(":")[-1]
                kind, variant = ("peer", "llm-compressor") if peer else ("sparsity", "llmprune")
                rows.append({"kind": kind, "label": f"{'llm-compressor ' if peer else ''}{method} {setting}",
                             "method": method, "variant": variant, "setting": setting,
                             "config": {"method": method, **SPARSITY_SETTINGS[setting]}})
    if args.legacy:
        for method in ("wanda", "sparsegpt", "alps"):
            rows.append({"kind": "owl", "label": f"{method} owl 70%", "method": method, "variant": "owl",
                         "setting": "70%", "config": {"method": method, "allocation": "owl", **SPARSITY_SETTINGS["70%"]}})
    for setting in ALPS_ORDER:
        rows.append({"kind": "sparsity", "label": f"alps {setting}", "method": "alps", "variant": "llmprune",
                     "setting": setting, "config": {"method": "alps", **SPARSITY_SETTINGS[setting]}})
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        rows = [r for r in rows if wanted & {r["kind"], r["method"], r["label"], r["setting"]}]
    return rows


# ---- one row, in a child process ------------------------------------------------------------------------
def _zero_fraction_kept(model) -> float:
    zeros = total = 0
    for name, p in model.named_parameters():
        if ".layers." in name and p.ndim == 2:
            zeros += int((p == 0).sum())
            total += p.numel()
    return 1 - zeros / total


def _run_tracked(cmd: list[str], env: dict, log: Path) -> tuple[int, str, float, float]:
    """Run ``cmd``; return (exit code, stdout, wall seconds, peak RSS MB of that process alone)."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    with open(log, "a") as f:
        f.write("\n--- stdout ---\n" + out)
    return proc.returncode, out, seconds, usage.ru_maxrss / 1024


def _parse_cli(out: str, cfg: dict) -> dict:
    """Achieved fractions and the pruning time from ``llmprune prune``'s tables."""
    res: dict = {}
    m = re.search(r"decoder-block parameters\s+([\d,]+)\s+([\d,]+)", out)
    if m:
        before, after = (int(x.replace(",", "")) for x in m.groups())
        res["block_before"], res["block_after"] = before, after
        res["kept"] = after / before
    for key, label in (("heads_removed", "attention heads"), ("ffn_removed", "FFN neurons")):
        m = re.search(rf"{label}\s+([\d.]+)\s+([\d.]+)", out)
        if m:
            res[key] = float(m.group(2))
    m = re.search(r"calibration tokens/s \(through pruning\)\s+([\d,]+)", out)
    if m:
        res["calib_tokens_per_s"] = int(m.group(1).replace(",", ""))
    m = re.search(r"llmprune: (.+?) -> ", out)
    if m:
        res["recipe"] = m.group(1)
    return res


def _score(model, tok, args: argparse.Namespace, result: dict, speed: bool) -> None:
    import torch

    from llmprune.eval.efficiency import measure_speed
    from llmprune.eval.perplexity import load_text, perplexity
    from llmprune.structured.pipeline import count_parameters

    model.eval()
    result["params"] = count_parameters(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        result["ppl"] = perplexity(model, tok, load_text(args.ppl), seq_len=args.ppl_seq_len,
                                   max_tokens=args.max_tokens, progress=False).ppl
    result["ppl_seconds"] = round(time.perf_counter() - t0, 1)
    if args.tasks:
        from llmprune.eval.tasks import evaluate_tasks

        t0 = time.perf_counter()
        res = evaluate_tasks(model, tok, args.tasks, limit=args.limit or None, batch_size=8)
        result["tasks"] = {k: {m: v[m] for m in ("acc", "acc_norm", "n_docs") if m in v} for k, v in res.items()}
        result["tasks_seconds"] = round(time.perf_counter() - t0, 1)
    if speed:
        sp = measure_speed(model, tok, prompt_len=128, new_tokens=32, batch_sizes=(1,), warmup=1, repeats=3)
        b = sp["batches"][1]
        result["speed"] = {"prompt_len": 128, "new_tokens": 32, "threads": torch.get_num_threads(),
                           "prefill_tokens_per_s": round(b["prefill_tokens_per_s"], 1),
                           "decode_tokens_per_s": round(b["decode_tokens_per_s"], 2)}


def run_row(row: dict, args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    from llmprune import load_model

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    calib = str(out_dir / "calib.safetensors")
    windows = load_file(calib)["input_ids"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / (re.sub(r"[^A-Za-z0-9]+", "_", row["label"]).strip("_") + ".log")
    result: dict = {}
    speed = row["kind"] in ("dense", "structured")
    if row["kind"] == "structured":
        folder = Path(tempfile.mkdtemp(prefix="bq-", dir=args.tmp)) / "pruned"
        exe = Path(sys.executable).with_name("llmprune")
        cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "llmprune"]
        cmd = cli + ["prune", args.model, "--heads", str(row["config"]["heads"]), "--ffn", str(row["config"]["ffn"]),
                     "--calib", args.calib, "--out", str(folder)]
        rc, out, seconds, peak = _run_tracked(cmd, env, log)
        if rc != 0:
            shutil.rmtree(folder.parent, ignore_errors=True)
            return {"error": f"llmprune prune exited {rc}; see {log}"}
        result.update(_parse_cli(out, row["config"]))
        result["cli_seconds"] = round(seconds, 1)
        # the pruning step alone, from the CLI's own throughput line over the windows the CLI drew itself
        # (read from the saved recipe: its defaults, capped at the model's context; not this benchmark's windows)
        from llmprune.checkpoint.io import read_recipe

        used = read_recipe(folder)["config"]
        result["calib_windows"] = [used["n_samples"], used["seq_len"]]
        tps = result.get("calib_tokens_per_s")
        tokens = used["n_samples"] * used["seq_len"]
        result["seconds"] = round(min(tokens / tps, seconds), 1) if tps else round(seconds, 1)
        result["peak_rss_mb"] = round(peak, 1)  # the CLI process: load + prune + save
        model, tok = load_model(str(folder))
        from llmprune.arch.surgery import widths_by_kind

        result["widths"] = widths_by_kind(model)  # where the allocation put the cut; bench_speed_real's shapes
        if not args.keep_models:
            shutil.rmtree(folder.parent, ignore_errors=True)
    elif row["kind"] == "peer":
        folder = Path(tempfile.mkdtemp(prefix="llmc-", dir=args.tmp)) / "model"
        cmd = [str(Path(args.peer_venv) / "bin" / "python"), str(REPO / "scripts" / "peer_llmcompressor.py"),
               "--model", args.model, "--calib", calib, "--method", row["config"]["method"],
               "--sparsity", str(row["config"]["sparsity"]), "--pattern", row["config"].get("pattern", "unstructured"),
               "--threads", str(args.threads), "--out", str(folder)]
        rc, _, seconds, peak = _run_tracked(cmd, {**env, "PYTHONPATH": ""}, log)
        if rc != 0:
            shutil.rmtree(folder.parent, ignore_errors=True)
            return {"error": f"peer exited {rc}; see {log}"}
        peer = json.loads((folder / "peer_result.json").read_text())
        model, tok = load_model(str(folder))
        shutil.rmtree(folder.parent, ignore_errors=True)
        result.update(kept=_zero_fraction_kept(model), seconds=peer["seconds"], peak_rss_mb=peer["peak_rss_mb"],
                      llmcompressor=peer.get("llmcompressor"), cli_seconds=round(seconds, 1))
    else:
        model, tok = load_model(args.model)
        t0 = time.perf_counter()
        if row["kind"] == "legacy":
            from llmprune import PruneConfig, prune
            from llmprune.cli.table import block_parameters

            dense_block = block_parameters(model)
            cfg = PruneConfig(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, **row["config"])
            t0 = time.perf_counter()
            prune(model, cfg, calibration=windows, progress=False)
            result["kept"] = block_parameters(model) / dense_block
        elif row["kind"] in ("sparsity", "owl"):
            from llmprune.sparsity import SparsityConfig, sparsify

            cfg = SparsityConfig(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, **row["config"])
            t0 = time.perf_counter()
            report = sparsify(model, cfg, calibration=windows, progress=False)
            result["kept"] = 1 - report.overall_sparsity
        else:
            result["kept"] = 1.0
        result["seconds"] = round(time.perf_counter() - t0, 2)
        result["peak_rss_mb"] = round(_peak_mb(), 1)
    _score(model, tok, args, result, speed)
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
    """The calibration windows every row sees, drawn once (the same function and seed as ``llmprune prune``'s
    ``--calib``); an existing file is reused so that a resumed run keeps its windows."""
    path = Path(args.out) / "calib.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        shape = tuple(load_file(str(path))["input_ids"].shape)
        if shape != (args.n_samples, args.seq_len):
            raise SystemExit(f"{path} holds {shape} windows, not ({args.n_samples}, {args.seq_len}); "
                             "use another --out")
        return
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text

    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    batches = calibration_batches(tok, read_calibration_text(args.calib), args.n_samples, args.seq_len, args.seed)
    save_file({"input_ids": torch.cat(batches).contiguous()}, str(path))


def _protocol(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("preset", "model", "calib", "ppl", "n_samples", "seq_len", "seed",
                                          "ppl_seq_len", "max_tokens", "tasks", "limit", "threads")}


def _machine(threads: int) -> str:
    from _machine import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, {threads} thread(s) per row"


def _tasks_cells(r: dict, tasks: list[str]) -> list[str]:
    t = r.get("tasks") or {}
    return [f"{_metric(t[k], k):.3f}" if k in t else "–" for k in tasks]


def _metric(values: dict, task: str) -> float:
    v = values.get(TASK_METRIC.get(task, "acc"))
    return values["acc"] if v is None else v


def _markdown(results: list[dict], proto: dict, machine: str) -> str:
    tasks = list(proto["tasks"] or [])
    dense = next((r for r in results if r["kind"] == "dense" and "ppl" in r), None)
    name = Path(proto["model"]).name
    shown_tasks = ", ".join(f"{k} ({TASK_METRIC.get(k, 'acc')})" for k in tasks)
    lines = [f"{name}; calibration {proto['n_samples']} x {proto['seq_len']} tokens of {Path(proto['calib']).name} "
             f"(seed {proto['seed']}, identical windows for every row and the peer); WikiText-2 raw test, first "
             f"{proto['max_tokens']} tokens, {proto['ppl_seq_len']}-token windows; lm-eval "
             f"{shown_tasks}, first {proto['limit']} documents "
             f"each; {machine}." + (f" Dense: {dense['ppl']:.2f}." if dense else ""), ""]
    tcols = "".join(f" {k} |" for k in tasks)
    tsep = "---|" * len(tasks)

    def cells(r: dict) -> str:
        if "error" in r:
            return " failed |" + " – |" * (len(tasks) + 2)
        return (f" {r['ppl']:.2f} |" + "".join(f" {c} |" for c in _tasks_cells(r, tasks))
                + f" {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")

    def speed(r: dict) -> str:
        s = r.get("speed")
        return f" {s['prefill_tokens_per_s']:.0f} | {s['decode_tokens_per_s']:.1f} |" if s else " – | – |"

    lines += ["**Dense and structured (library default recipe through the CLI; fraction of decoder-block "
              "parameters removed)**", "",
              f"| row | --heads | --ffn | CLI calibration | heads removed | FFN removed | block params removed | PPL |{tcols} "
              "prune time (s) | peak RSS (MB) | prefill tok/s | decode tok/s |",
              f"|---|---|---|---|---|---|---|---|{tsep}---|---|---|---|"]
    for r in results:
        if r["kind"] == "dense":
            lines.append(f"| dense | – | – | – | – | – | 0 |{cells(r)}{speed(r)}")
        elif r["kind"] == "structured":
            c = r.get("config", {})
            if "error" in r:
                lines.append(f"| {r['label']} | {c.get('heads')} | {c.get('ffn')} | – | – | – | – |{cells(r)} – | – |")
                continue
            windows = "x".join(map(str, r["calib_windows"])) if r.get("calib_windows") else "–"  # the CLI's own
            lines.append(f"| {r['label']} | {c['heads']} | {c['ffn']} | {windows} | {r.get('heads_removed', 0):.3f} | "
                         f"{r.get('ffn_removed', 0):.3f} | {1 - r['kept']:.1%} |{cells(r)}{speed(r)}")
    if not any(r["kind"] == "structured" for r in results):
        lines += ["", "structured rows: run `python scripts/bench_quality.py --out OUT --threads 1 --only structured`"]
    lines.append("")
    for kind, title in (("legacy", "Structured, criteria x variants (in-process)"),
                        ("sparsity", "Weight sparsity (llmprune and llm-compressor, same windows)")):
        chosen = [r for r in results if r["kind"] == kind or (kind == "sparsity" and r["kind"] in ("peer", "owl"))]
        if not chosen:
            continue
        if kind == "sparsity":
            order = {s: i for i, s in enumerate(SPARSITY_SETTINGS)}
            chosen.sort(key=lambda r: order.get(r["setting"], 9))
        lines += [f"**{title}**", "", f"| method | variant | setting | kept | PPL |{tcols} time (s) | peak RSS (MB) |",
                  f"|---|---|---|---|---|{tsep}---|---|"]
        for r in chosen:
            kept = f"{r['kept']:.3f}" if "kept" in r else "–"
            lines.append(f"| {r['method']} | {r['variant']} | {r['setting']} | {kept} |{cells(r)}")
        lines.append("")
    return "\n".join(lines)


def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if "error" in r or r["kind"] == "dense" or "ppl" not in r:
            continue
        key = (f"{r['kind']}: {r['method']} {r['variant']}".strip()
               + (" 2:4" if r["setting"] == "2:4" else ""))
        groups.setdefault(key, []).append((r["kept"], r["ppl"]))
    for key, pts in sorted(groups.items()):
        pts.sort()
        style = "s--" if key.startswith("peer") else ("o-" if key.startswith(("structured", "legacy")) else "^-")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key, markersize=4)
    dense = next((r for r in results if r["kind"] == "dense" and "ppl" in r), None)
    if dense:
        ax.axhline(dense["ppl"], color="black", lw=0.8, ls=":", label=f"dense ({dense['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("fraction kept (structured: decoder-block parameters; sparsity: non-zero block weights)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _write(out: Path, proto: dict, machine: str, results: list[dict]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"machine": machine, "protocol": proto, "rows": results}, indent=2))
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(_markdown(results, proto, machine))
    _plot(results, out / "ppl_vs_kept.png", f"{Path(proto['model']).name}, no training")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default="real",
                    help="real: SmolLM2-135M-Instruct (default); ref: the 7M reference model and its old protocol")
    ap.add_argument("--model", default=None, help="model folder (default: the preset's)")
    ap.add_argument("--calib", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--ppl", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    ap.add_argument("--n-samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-seq-len", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--tasks", default="lambada,piqa,openbookqa", help="lm-eval tasks ('' for none)")
    ap.add_argument("--limit", type=int, default=100, help="documents per lm-eval task (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/real_quality")
    ap.add_argument("--only", default=None,
                    help="comma-separated kinds (dense, structured, sparsity, peer; ref: legacy, owl), methods "
                         "(alps, wanda...), settings (50%%, 2:4) or labels; a row is run when any matches")
    ap.add_argument("--peer-venv", default=str(REPO.parent / "venvs" / "llmc"),
                    help="virtual environment with llmcompressor (created when missing)")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip llm-compressor")
    ap.add_argument("--keep-models", action="store_true", help="keep the structured rows' pruned folders")
    ap.add_argument("--tmp", default=None, help="folder for the pruned checkpoints (default: the system's)")
    ap.add_argument("--replot", action="store_true", help="rewrite results.md and the plot from OUT/results.json")
    ap.add_argument("--list", action="store_true", help="print the rows that would run, and whether done")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # child mode: one row as JSON
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    for key in ("n_samples", "seq_len", "ppl_seq_len", "max_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.targets, args.legacy = preset["targets"], preset["legacy"]
    args.tasks = [t for t in args.tasks.split(",") if t.strip()]
    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        _write(out, saved["protocol"], saved["machine"], saved["rows"])
        return 0
    if args.model is None:
        args.model = default_model(args.preset)
    if args.run:
        print("RESULT " + json.dumps(run_row(json.loads(args.run), args)), flush=True)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    proto = _protocol(args)
    saved_path = out / "results.json"
    results: list[dict] = []
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        diff = {k: (saved["protocol"].get(k), v) for k, v in proto.items() if saved["protocol"].get(k) != v}
        if diff:
            raise SystemExit(f"{saved_path} was measured with another protocol {diff}; use another --out")
        results = saved["rows"]
    done = {r["label"] for r in results if "error" not in r}  # failed rows are retried
    rows = [r for r in _rows(args) if args.peer or r["kind"] != "peer"]
    if args.list:
        for r in rows:
            print(f"{'done' if r['label'] in done else 'todo'}  {r['label']}")
        return 0
    todo = [r for r in rows if r["label"] not in done]
    if any(r["kind"] == "peer" for r in todo) and not _ensure_peer_venv(Path(args.peer_venv)):
        todo = [r for r in todo if r["kind"] != "peer"]
    _calibration(args)
    machine = _machine(args.threads)
    print(f"{len(rows) - len(todo)} rows already in {saved_path}, {len(todo)} to run", flush=True)
    child_args = [a for a in sys.argv[1:]]
    if "--model" not in child_args:
        child_args += ["--model", args.model]
    for row in todo:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--run", json.dumps(row)] + child_args
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"error": proc.stderr[-3000:]}
        res["row_seconds"] = round(time.perf_counter() - t0, 1)
        results = [r for r in results if r["label"] != row["label"]] + [{**row, **res}]
        if "ppl" in res:
            shown = (f"ppl {res['ppl']:.2f}, kept {res['kept']:.3f}, prune {res['seconds']}s, "
                     f"rss {res['peak_rss_mb']:.0f} MB, row {res['row_seconds']}s")
            if res.get("tasks"):
                shown += ", " + " ".join(f"{k} {_metric(v, k):.3f}"
                                         for k, v in res["tasks"].items())
        else:
            shown = "FAILED: " + res["error"][-600:]
        print(f"{row['label']:<36} {shown}", flush=True)
        _write(out, proto, machine, results)
    if results:
        _write(out, proto, machine, results)
        print("\n" + _markdown(results, proto, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
