"""Pruned models in llama.cpp (issue 39): perplexity against transformers' on the same windows, prompt-processing
and generation speed, file sizes, each for the exported GGUF files of a dense model and its pruned outputs.

Each model is a ``NAME=FOLDER:GGUF[,GGUF...]`` entry: the safetensors folder (transformers' PPL) and its GGUF files
(written by ``llmprune export`` / ``prune --export gguf``). Speed rounds alternate the files (and thread counts)
so drifting load on shared cores hits all of them alike; the median of ``--rounds`` is reported. pp = one batch of
``--pp`` tokens from an empty cache; tg = ``--tg`` single-token decodes from an empty cache (llama-bench's pp512 /
tg128 protocol, through llama-cpp-python). "ideal" is the ratio of weight bytes read per generated token (every
matrix; the token embedding only where it is also the output head).

    python scripts/bench_llamacpp.py --ppl ../shared/data/wikitext2-raw-test.txt \\
        dense=SMOL:smol-F32.gguf,smol-Q8_0.gguf p25=runs/p25:runs/p25/p25-F32.gguf,runs/p25-Q8_0.gguf \\
        --out bench/llamacpp/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402


def weight_bytes_per_token(path: str) -> tuple[int, str]:
    """Bytes of every matrix a generated token reads, and the file's outtype label."""
    import gguf

    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:  # untied: the embedding is only gathered (one row per token)
        total -= sizes["token_embd.weight"]
    kinds = {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")}
    return total, "/".join(sorted(kinds))


def llamacpp_ppl(path: str, ids: list[int], plan: list[tuple[int, int, int]], threads: int) -> float:
    from llama_cpp import Llama

    seq = plan[0][1] - plan[0][0]
    llm = Llama(model_path=path, n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    nll, n = 0.0, 0
    for start, end, first in plan:
        llm.reset()
        window = ids[start:end]
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = np.asarray(window[first - start:])
        nll -= float(logp[np.arange(first - start - 1, end - start - 1), targets].sum())
        n += len(targets)
    del llm
    return math.exp(nll / n)


def transformers_ppl(folder: str, text: str, seq_len: int, max_tokens: int) -> tuple[float, list[int]]:
    import torch

    from llmprune.checkpoint.io import load_model
    from llmprune.eval.perplexity import perplexity, tokenize_text

    model, tok = load_model(folder, dtype=torch.float32)
    ids = tokenize_text(tok, text, max_tokens).tolist()
    r = perplexity(model.eval(), tok, text, seq_len=seq_len, max_tokens=max_tokens, progress=False)
    del model
    return r.ppl, ids


def speed(paths: list[str], threads: list[int], pp: int, tg: int, rounds: int) -> dict:
    from llama_cpp import Llama

    llms = {(p, t): Llama(model_path=p, n_ctx=max(pp, tg) + 16, n_batch=pp, n_ubatch=pp, n_threads=t,
                          n_threads_batch=t, verbose=False) for p in paths for t in threads}
    vocab = min(llm.n_vocab() for llm in llms.values())
    rng = np.random.default_rng(0)  # the same random tokens for every file (speed does not depend on them)
    prompt = rng.integers(10, vocab, size=pp).tolist()
    gen = rng.integers(10, vocab, size=tg).tolist()
    times: dict[tuple[str, int], dict[str, list[float]]] = {k: {"pp": [], "tg": []} for k in llms}
    for llm in llms.values():  # warm-up (page in the weights)
        llm.reset()
        llm.eval(prompt[:64])
    for r in range(rounds):
        order = list(llms) if r % 2 == 0 else list(reversed(list(llms)))
        for key in order:
            llm = llms[key]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            times[key]["pp"].append(pp / (time.perf_counter() - t0))
            llm.reset()
            t0 = time.perf_counter()
            for token in gen:
                llm.eval([token])
            times[key]["tg"].append(tg / (time.perf_counter() - t0))
    return {f"{p}|{t}": {k: statistics.median(v) for k, v in d.items()} | {"runs": d}
            for (p, t), d in times.items()}


def markdown(result: dict) -> str:
    """Tables for BENCHMARKS.md: perplexity (transformers vs llama.cpp) and, per file, size and speed with the
    speedup over the first model's file of the same type, against the ideal (weight bytes read per token)."""
    lines = ["| model | file | transformers PPL | llama.cpp PPL | difference |", "|---|---|---|---|---|"]
    for name, m in result["models"].items():
        for f, fe in m["files"].items():
            if "ppl_llamacpp" in fe:
                lines.append(f"| {name} | {Path(f).name} | {m['ppl_transformers']:.3f} | {fe['ppl_llamacpp']:.3f} | "
                             f"{100 * fe['ppl_rel_diff']:+.3f}% |")
    speed = result.get("speed") or {}
    threads = sorted({int(k.rsplit("|", 1)[1]) for k in speed})
    head = "| model | file | type | size (MiB) | weight bytes/token (MiB) |"
    sep = "|---|---|---|---|---|"
    for t in threads:
        head += f" pp512 t/s ({t} thr) | tg128 t/s ({t} thr) | tg speedup / ideal ({t} thr) |"
        sep += "---|---|---|"
    lines += ["", head, sep]
    base: dict[str, tuple[str, dict]] = {}
    for name, m in result["models"].items():
        for f, fe in m["files"].items():
            base.setdefault(fe["attn_q_type"], (f, fe))
    for name, m in result["models"].items():
        for f, fe in m["files"].items():
            bf, bfe = base[fe["attn_q_type"]]
            ideal = bfe["weight_bytes_per_token"] / fe["weight_bytes_per_token"]
            row = (f"| {name} | {Path(f).name} | {fe['attn_q_type']} | {fe['size_bytes'] / 2**20:.1f} | "
                   f"{fe['weight_bytes_per_token'] / 2**20:.1f} |")
            for t in threads:
                s_, b_ = speed.get(f"{f}|{t}"), speed.get(f"{bf}|{t}")
                if s_ is None or b_ is None:
                    row += " – | – | – |"
                    continue
                up = s_["tg"] / b_["tg"]
                row += f" {s_['pp']:.0f} | {s_['tg']:.1f} | {up:.2f}x / {ideal:.2f}x ({100 * up / ideal:.0f}%) |"
            lines.append(row)
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--table":  # render a results file: --table results.json
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=FOLDER:GGUF[,GGUF...] (the first is the baseline)")
    ap.add_argument("--ppl", required=True, help="perplexity text")
    ap.add_argument("--ppl-seq-len", type=int, default=512)
    ap.add_argument("--ppl-max-tokens", type=int, default=20000)
    ap.add_argument("--ppl-threads", type=int, default=2)
    ap.add_argument("--ppl-models", default=None, help="comma-separated NAMEs whose PPL is measured (default: all)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from llmprune.eval.perplexity import load_text, windows

    text = load_text(args.ppl)
    models = []
    for spec in args.models:
        name, rest = spec.split("=", 1)
        folder, files = rest.split(":", 1)
        models.append((name, folder, files.split(",")))
    result: dict = {"machine": cpu_name(), "cpus": os.cpu_count(), "args": vars(args), "models": {}}
    ppl_models = set(args.ppl_models.split(",")) if args.ppl_models else {m[0] for m in models}
    for name, folder, files in models:
        t0 = time.perf_counter()
        entry: dict = {"folder": folder, "files": {}}
        if name in ppl_models:
            entry["ppl_transformers"], ids = transformers_ppl(folder, text, args.ppl_seq_len, args.ppl_max_tokens)
            plan = windows(len(ids), args.ppl_seq_len)
        for f in files:
            nbytes, kinds = weight_bytes_per_token(f)
            fe = {"size_bytes": os.path.getsize(f), "weight_bytes_per_token": nbytes, "attn_q_type": kinds}
            if name in ppl_models:
                fe["ppl_llamacpp"] = llamacpp_ppl(f, ids, plan, args.ppl_threads)
                fe["ppl_rel_diff"] = fe["ppl_llamacpp"] / entry["ppl_transformers"] - 1
            entry["files"][f] = fe
        entry["ppl_seconds"] = time.perf_counter() - t0
        result["models"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    if not args.skip_speed:
        paths = [f for _, _, files in models for f in files]
        threads = [int(t) for t in args.threads.split(",")]
        result["speed"] = speed(paths, threads, args.pp, args.tg, args.rounds)
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in result["speed"].items()},
                         indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
