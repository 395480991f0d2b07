#!/usr/bin/env python
"""Peak memory and time of pruning real-size models, in memory vs streamed (one decoder layer at a time).

Writes random-weight Llama checkpoints of real shapes to disk (bf16, sharded at 1 GB, with the reference
model's tokenizer), then prunes each with

- ``obs`` structured, 25% of heads and FFN neurons: the default recipe (obs + fisher; a layer-by-layer Fisher
  pass, a pricing pass, the sequential cut);
- ``wanda`` structured, 25% of heads and FFN neurons (uniform; a scoring pass, then a cutting pass);
- ``sparsegpt`` 50% unstructured;

both in memory (``load_model`` + ``prune`` / ``sparsify`` + the default verified ``save_pruned``) and streamed
(:mod:`llmprune.streaming`), every run in its own process; the sparsegpt job also with llm-compressor
(``oneshot`` with its default sequential pipeline, bf16, in its own venv via ``scripts/peer_llmcompressor.py``,
on the same calibration windows) when ``--peer-venv`` exists. Recorded: peak RSS (VmHWM; peak GPU memory too when
there is a GPU), wall time, calibration tokens/s (calibration tokens / wall time) and the checkpoint size.

    python scripts/bench_scale.py --sizes 0.1b,0.5b,1b,3b --out bench/scale

Sizes (Llama-3 style: GQA, SwiGLU, vocab 32k for the small two, Llama-3.2 shapes for 1b / 3b):
``0.1b`` hidden 768 x 12 layers; ``0.5b`` 1536 x 16; ``1b`` = Llama-3.2-1B (2048 x 16, vocab 128k, tied);
``3b`` = Llama-3.2-3B (3072 x 28, vocab 128k, tied).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))

SHAPES = {
    "0.1b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, vocab_size=32000, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=4096, vocab_size=32000, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
JOBS = ("obs-structured-25", "wanda-structured-25", "sparsegpt-50")


def write_checkpoint(size: str, folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[size])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: a 3B model never exists in fp32 (13 GB)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(SHARED / "models" / "ref-llama-7m", trust_remote_code=False).save_pretrained(tmp)
    os.replace(tmp, folder)


def _cores() -> int:
    """The cores this process may run on (``taskset`` pins a benchmark next to other work)."""
    return len(os.sched_getaffinity(0))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(folder: str, job: str, mode: str, out: str, n_samples: int, seq_len: int) -> dict:
    import torch

    from llmprune import PruneConfig, load_model, prune
    from llmprune.checkpoint.io import save_pruned
    from llmprune.sparsity import SparsityConfig, sparsify
    from llmprune.streaming import prune_streaming, sparsify_streaming

    torch.set_num_threads(_cores())
    calib = str(SHARED / "data" / "reference-train.txt")
    device = "cuda" if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    structured = job.startswith(("obs", "wanda"))
    if job.startswith("obs"):  # the default recipe
        cfg = PruneConfig(heads=0.25, ffn=0.25, n_samples=n_samples, seq_len=seq_len)
    elif job.startswith("wanda"):
        cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda", n_samples=n_samples, seq_len=seq_len)
    else:
        cfg = SparsityConfig(method="sparsegpt", sparsity=0.5, n_samples=n_samples, seq_len=seq_len)
    if mode == "streaming":
        fn = prune_streaming if structured else sparsify_streaming
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        fn(folder, cfg, out, tokenizer=tok, calibration=calib, device=device, overwrite=True, progress=False)
    else:
        model, tok = load_model(folder)
        if structured:
            result = prune(model, cfg, tokenizer=tok, calibration=calib, device=device, progress=False)
            save_pruned(model, out, tokenizer=tok, config=cfg, plan=result.plan, overwrite=True)
        else:
            sparsify(model, cfg, tokenizer=tok, calibration=calib, device=device, progress=False)
            save_pruned(model, out, tokenizer=tok, overwrite=True)
    seconds = time.perf_counter() - t0
    row = {"job": job, "mode": mode, "seconds": round(seconds, 1), "peak_rss_gb": round(_status_mb("VmHWM") / 1024, 2),
           "calib_tokens": n_samples * seq_len, "tokens_per_s": round(n_samples * seq_len / seconds, 1),
           "threads": _cores()}
    if torch.cuda.is_available():
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1b,0.5b,1b,3b")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--modes", default="in-memory,streaming")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", default="/tmp/llmprune-bench-scale", help="where the checkpoints are written")
    ap.add_argument("--out", default="bench/scale")
    ap.add_argument("--peer-venv", default=str(REPO.parent / "venvs" / "llmc"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, job, mode, out = args.child
        print("RESULT " + json.dumps(child(folder, job, mode, out, args.n_samples, args.seq_len)), flush=True)
        return 0
    import torch

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    rows = saved["rows"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from _machine import cpu_name

    machine = (f"{cpu_name()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} "
               f"GiB; torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    for size in args.sizes.split(","):
        folder = work / f"llama-{size}"
        write_checkpoint(size, folder)
        ckpt_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
        peer_python = Path(args.peer_venv) / "bin" / "python"
        for job in args.jobs.split(","):
            modes = args.modes.split(",") + (["llm-compressor"] if job.startswith("sparsegpt") and
                                             peer_python.is_file() else [])
            for mode in modes:
                target = work / f"out-{size}-{job}-{mode}"
                if mode == "llm-compressor":
                    row = _peer(peer_python, folder, target, work, args)
                else:
                    proc = subprocess.run([sys.executable, __file__, "--n-samples", str(args.n_samples), "--seq-len",
                                           str(args.seq_len), "--child", str(folder), job, mode, str(target)],
                                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    row = json.loads(line[7:]) if line else {"job": job, "mode": mode,
                                                             "error": (proc.stderr or "")[-600:]}
                row["job"], row["mode"] = job, mode
                row.update(size=size, checkpoint_gb=round(ckpt_gb, 2))
                rows = [r for r in rows if (r.get("size"), r.get("job"), r.get("mode")) != (size, job, mode)]
                rows.append(row)
                print(row, flush=True)
                results_path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
                shutil.rmtree(target, ignore_errors=True)
    _write(json.loads(results_path.read_text()), out_dir)
    print((out_dir / "results.md").read_text())
    return 0


def _peer(python: Path, folder: Path, target: Path, work: Path, args: argparse.Namespace) -> dict:
    """llm-compressor's SparseGPT 50% on the windows llmprune calibrates on (written as safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text

    calib = work / f"calib-{args.n_samples}x{args.seq_len}.safetensors"
    if not calib.is_file():
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        text = read_calibration_text(SHARED / "data" / "reference-train.txt")
        ids = torch.cat(calibration_batches(tok, text, args.n_samples, args.seq_len, 0))
        save_file({"input_ids": ids.contiguous()}, str(calib))
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(REPO / "scripts" / "peer_llmcompressor.py"), "--model", str(folder),
                           "--calib", str(calib), "--method", "sparsegpt", "--sparsity", "0.5", "--out", str(target),
                           "--dtype", "bfloat16", "--threads", str(_cores())],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    res = target / "peer_result.json"
    if proc.returncode != 0 or not res.is_file():
        return {"error": (proc.stderr or "")[-600:]}
    r = json.loads(res.read_text())
    tokens = args.n_samples * args.seq_len
    return {"seconds": r["seconds"], "peak_rss_gb": round(r["peak_rss_mb"] / 1024, 2), "calib_tokens": tokens,
            "tokens_per_s": round(tokens / r["seconds"], 1), "process_wall_s": round(wall, 1), "threads": _cores(),
            "llmcompressor": r.get("llmcompressor")}


def _write(saved: dict, out_dir: Path) -> None:
    order = {s: i for i, s in enumerate(SHAPES)}
    rows = sorted(saved["rows"], key=lambda r: (order.get(r["size"], 99), r["job"], r["mode"]))
    lines = [f"Machine: {saved['machine']}.", "",
             "| size | checkpoint (GB, bf16) | job | mode | threads | peak RSS (GB) | wall (s) | calibration tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['checkpoint_gb']} | {r['job']} | {r['mode']} | | failed | | |")
            continue
        lines.append(f"| {r['size']} | {r['checkpoint_gb']} | {r['job']} | {r['mode']} | {r.get('threads', 2)} | "
                     f"{r['peak_rss_gb']} | "
                     f"{r['seconds']} | {r['tokens_per_s']} |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for job in JOBS:
        for mode, style in (("in-memory", "-o"), ("streaming", "--s"), ("llm-compressor", ":^")):
            pts = sorted((r["checkpoint_gb"], r["peak_rss_gb"]) for r in rows
                         if r["job"] == job and r["mode"] == mode and "error" not in r)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{job}, {mode}")
    sizes = sorted({r["checkpoint_gb"] for r in rows})
    if sizes:
        ax.plot(sizes, sizes, ":", color="gray", label="checkpoint size")
    ax.set_xlabel("checkpoint size (GB, bf16)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("pruning peak memory: in memory vs streamed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "peak_rss.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
