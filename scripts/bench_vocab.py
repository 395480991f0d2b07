#!/usr/bin/env python
"""Bits per byte of pruned real models, with and without the vocabulary axis (BENCHMARKS.md, "Vocabulary pruning").

Each row is one ``llmprune prune`` command (its own process, timed with ``/usr/bin/time -v``), then one evaluation
process scoring the output on the **same text** whatever its tokenizer:

- ``wikitext2``: the first ``--chars`` characters of WikiText-2 raw test (the calibration text,
  ``reference-train.txt``, holds WikiText-2 *validation*, so this text is in-domain);
- ``held-out``: the first ``--chars`` characters of the LAMBADA test passages (novels), joined by blank lines:
  text of another source than the calibration text.

Both are scored in 512-token windows (BOS in each where the tokenizer adds one), every token of the cut text; the
figure that compares tokenizers is bits per byte (PPL is per token and is shown for the dense rows only).

    python scripts/bench_vocab.py --model smollm2-135m-instruct --out bench/vocab \\
        --row "block-only=--heads 0.333333 --ffn 0.339" --row "vocab+blocks=--vocab 0.3 --heads 0.25 --ffn 0.25"

``--model`` is a name of ``scripts/real_model.py`` (prepared on first use) or a folder. Rows already in
``OUT/results.json`` are skipped, so a killed run resumes. The dense model is always the first row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))
CALIB = SHARED / "data" / "reference-train.txt"


def texts(chars: int) -> dict[str, str]:
    wiki = (SHARED / "data" / "wikitext2-raw-test.txt").read_text(encoding="utf-8")[:chars]
    passages = [json.loads(line)["text"] for line in (SHARED / "data" / "tasks" / "lambada" /
                                                     "lambada_test.jsonl").read_text().splitlines() if line.strip()]
    held = "\n\n".join(passages)[:chars]
    return {"wikitext2": wiki, "held-out": held}


def model_folder(name: str) -> str:
    if Path(name).is_dir():
        return name
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "real_model.py"), name], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def evaluate(folder: str, chars: int) -> dict:
    """Run in a child process: bits per byte and PPL of ``folder`` on each text, and its parameter count."""
    import torch

    import llmprune
    from llmprune.eval import perplexity

    torch.set_num_threads(1)
    model, tok = llmprune.load_model(folder)
    row = {"params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
           "vocab_size": int(model.config.vocab_size)}
    for name, text in texts(chars).items():
        r = perplexity(model.eval(), tok, text, seq_len=512, progress=False)
        row[name] = {"bpb": round(r.bits_per_byte, 4), "ppl": round(r.ppl, 2), "tokens": r.n_tokens,
                     "bytes": r.n_bytes}
    return row


def _time_v(stderr: str) -> dict:
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {"peak_rss_gb": round(int(peak.group(1)) / 2**20, 2) if peak else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--row", action="append", default=[], help="NAME=prune flags (repeatable)")
    ap.add_argument("--chars", type=int, default=80_000, help="characters of each text scored")
    ap.add_argument("--work", default="/tmp/llmprune-bench-vocab")
    ap.add_argument("--out", default="bench/vocab")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(evaluate(args.child, args.chars)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    folder = model_folder(args.model)
    rows = [("dense", None)] + [tuple(r.split("=", 1)) for r in args.row]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name, flags in rows:
        if any(r["model"] == args.model and r["row"] == name for r in saved["rows"]):
            continue
        row = {"model": args.model, "row": name, "flags": flags or ""}
        target = folder
        if flags is not None:
            target = str(Path(args.work) / f"{Path(folder).name}-{name}")
            cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "llmprune", "prune", folder, *shlex.split(flags),
                   "--calib", str(CALIB), "--out", target, "--overwrite", "--quiet"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            row.update(prune_seconds=round(time.perf_counter() - t0, 1), **_time_v(proc.stderr))
            if proc.returncode != 0:
                row["error"] = proc.stderr[-800:]
                print(row, flush=True)
                continue
        proc = subprocess.run([sys.executable, __file__, "--chars", str(args.chars), "--child", target],
                              capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        row.update(json.loads(line[7:]) if line else {"error": proc.stderr[-800:]})
        saved["rows"].append(row)
        path.write_text(json.dumps(saved, indent=2))
        print(row, flush=True)
    _write_md(saved, out / "results.md")
    print((out / "results.md").read_text())
    return 0


def _write_md(saved: dict, path: Path) -> None:
    lines = ["| model | row | flags | params | removed | bpb WikiText-2 | x dense | bpb held-out | x dense | prune wall (s) "
             "| prune peak RSS (GB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r for r in saved["rows"] if r["row"] == "dense" and "params" in r}
    for r in saved["rows"]:
        d = dense.get(r["model"])
        if "params" not in r or d is None:
            lines.append(f"| {r['model']} | {r['row']} | `{r['flags']}` | error | | | | | | | |")
            continue
        ratio = lambda k: f"{r[k]['bpb'] / d[k]['bpb']:.3f}"
        lines.append(f"| {r['model']} | {r['row']} | `{r['flags']}` | {r['params']:,} | "
                     f"{1 - r['params'] / d['params']:.1%} | {r['wikitext2']['bpb']} | {ratio('wikitext2')} | "
                     f"{r['held-out']['bpb']} | {ratio('held-out')} | {r.get('prune_seconds', '')} | "
                     f"{r.get('peak_rss_gb', '')} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
