#!/usr/bin/env python
"""Single-unit performance on a real model: every ``single_unit_score`` against magnitude, wanda and the default
recipe (obs + fisher), at 25% of the FFN neurons and at 25% of the heads and of the FFN neurons, no training.

Per row: WikiText-2 perplexity (BENCHMARKS.md's real-model protocol: raw test, first ``--max-tokens`` tokens,
non-overlapping ``--ppl-seq-len`` windows, tail dropped) and perplexity on held-out text never used for
calibration (``llmprune recover``'s protocol: the calibration text is tokenised once and its last
``--held-out-windows`` x ``--ppl-seq-len`` tokens are the held-out windows, every window scored whole); the
calibration windows (``--n-samples`` x ``--seq-len``, drawn by the library's stratified sampler with ``--seed``)
come from the text before that tail, the same windows for every row. Also the share of decoder-block parameters
removed and the pruning time.

Resumable per row: ``OUT/results.json`` keeps every finished row (keyed by its label) and a rerun skips them;
``OUT/results.md`` is rewritten from it after each row. Two processes may fill the same folder with different
``--only`` rows (each row is merged in under a lock). A results.json measured under another protocol is refused
(use another ``--out``).

    python scripts/bench_single_unit.py                                   # SmolLM2-135M (scripts/real_model.py)
    python scripts/bench_single_unit.py --only "dense,ffn25"              # the FFN-only rows
    python scripts/bench_single_unit.py --model ../shared/models/ref-llama-7m --n-samples 4 --seq-len 64 \\
        --ppl-seq-len 64 --max-tokens 2000 --held-out-windows 4 --out /tmp/su --only "dense,ffn25 magnitude"   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: the two cuts: PruneConfig ratios
SETTINGS = {"ffn25": {"ffn": 0.25}, "heads25+ffn25": {"heads": 0.25, "ffn": 0.25}}
#: the methods: a label and its PruneConfig fields (the default recipe: no method field at all)
METHODS = {
    "single-unit:clusters": {"method": "single-unit", "single_unit_score": "clusters"},
    "single-unit:snr": {"method": "single-unit", "single_unit_score": "snr"},
    "single-unit:solo-loss": {"method": "single-unit", "single_unit_score": "solo-loss"},
    "single-unit:solo-loss-refit": {"method": "single-unit", "single_unit_score": "solo-loss-refit"},
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "default (obs)": {},
}


def rows() -> list[tuple[str, dict]]:
    """Every row: ``(label, PruneConfig fields)``; ``dense`` first."""
    out = [("dense", {})]
    for setting, ratios in SETTINGS.items():
        out += [(f"{setting} {method}", {**ratios, **fields}) for method, fields in METHODS.items()]
    return out


def held_out_split(tok, text: str, windows: int, seq_len: int):
    """``(calibration text, held-out windows [windows, seq_len])``: the text's last ``windows * seq_len`` tokens
    (tokenised once, no special tokens, as ``llmprune recover`` does) and the text before them."""
    import torch

    enc = tok(text, add_special_tokens=False, return_attention_mask=False,
              return_offsets_mapping=bool(getattr(tok, "is_fast", False)), verbose=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    held = windows * seq_len
    if ids.numel() < 2 * held:
        raise SystemExit(f"the calibration text has {ids.numel()} tokens: too few for {windows} held-out windows of "
                         f"{seq_len} and calibration before them")
    cut = enc["offset_mapping"][ids.numel() - held][0] if "offset_mapping" in enc else None
    before = text[:cut] if cut is not None else tok.decode(ids[:-held])
    return before, ids[-held:].reshape(windows, seq_len)


def held_out_ppl(model, windows, batch: int = 4) -> float:
    """exp(mean next-token NLL) over the held-out windows, each window scored whole."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total = count = 0.0
    with torch.no_grad():
        for part in windows.split(batch):
            part = part.to(device)
            logits = model(input_ids=part, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += part[:, 1:].numel()
    return math.exp(total / count)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a kill leaves the old or the new file


def read_results(path: Path, protocol: dict) -> dict:
    """The rows so far (another process running other ``--only`` rows may have added some)."""
    data = json.loads(path.read_text()) if path.is_file() else {"protocol": protocol, "rows": {}}
    if data["protocol"] != protocol:
        raise SystemExit(f"{path} was measured with {data['protocol']}, not {protocol}: use another --out")
    return data


def add_row(path: Path, protocol: dict, label: str, row: dict) -> dict:
    """Merge one finished row into ``path`` (and rewrite results.md), under a lock so that processes running
    other rows into the same folder keep each other's rows."""
    import fcntl

    with open(path.with_name(".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_results(path, protocol)
        data["rows"][label] = row
        _write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        _write(path.with_name("results.md"), report(data))
    return data


def report(data: dict) -> str:
    p = data["protocol"]
    lines = [f"{p['model']}; calibration {p['n_samples']} x {p['seq_len']} tokens of {p['calib']} before its "
             f"held-out tail (seed {p['seed']}); WikiText-2 PPL: first {p['max_tokens']} tokens of {p['ppl']}, "
             f"{p['ppl_seq_len']}-token windows; held-out PPL: the last {p['held_out_windows']} x "
             f"{p['ppl_seq_len']} tokens of {p['calib']}. No training.", "",
             "| row | block params removed | WikiText-2 PPL | x dense | held-out PPL | x dense | prune s |",
             "|---|---|---|---|---|---|---|"]
    dense = data["rows"].get("dense")
    for label, _ in rows():
        r = data["rows"].get(label)
        if r is None:
            continue
        ratio = (lambda key: f"{r[key] / dense[key]:.2f}" if dense else "")
        lines.append(f"| {label} | {r['block_removed']:.1%} | {r['ppl']:.2f} | {ratio('ppl')} | "
                     f"{r['held_out_ppl']:.2f} | {ratio('held_out_ppl')} | {r.get('prune_seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M from scripts/real_model.py)")
    ap.add_argument("--calib", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--ppl", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    ap.add_argument("--n-samples", type=int, default=64, help="calibration windows (default 64)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    ap.add_argument("--ppl-seq-len", type=int, default=512, help="perplexity window length (default 512)")
    ap.add_argument("--max-tokens", type=int, default=20000, help="WikiText-2 tokens scored (default 20000)")
    ap.add_argument("--held-out-windows", type=int, default=16, help="held-out windows at the end of --calib")
    ap.add_argument("--only", default="", help="comma-separated label prefixes: run only the rows whose label starts "
                                               "with one (e.g. 'dense,ffn25' or 'heads25+ffn25 single-unit')")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "single_unit_real"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from llmprune import PruneConfig, load_model, prune
    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text
    from llmprune.checkpoint.io import load_tokenizer, public_name
    from llmprune.cli.table import block_parameters
    from llmprune.eval.perplexity import load_text, perplexity

    if args.model is None:
        sys.path.insert(0, str(REPO / "scripts"))
        from real_model import real_model_path

        args.model = str(real_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = {"model": public_name(args.model), "calib": public_name(args.calib), "ppl": public_name(args.ppl),
                **{k: getattr(args, k) for k in ("n_samples", "seq_len", "seed", "ppl_seq_len", "max_tokens",
                                                 "held_out_windows")}}
    path = out / "results.json"
    data = read_results(path, protocol)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    todo = [(label, fields) for label, fields in rows()
            if label not in data["rows"] and (not wanted or label.startswith(tuple(wanted)))]
    if not todo:
        print(f"nothing to run: every selected row is in {path}")
        return 0
    tok = load_tokenizer(args.model)
    calib_text, held = held_out_split(tok, read_calibration_text(args.calib), args.held_out_windows, args.ppl_seq_len)
    windows = torch.cat(calibration_batches(tok, calib_text, args.n_samples, args.seq_len, args.seed))
    wikitext = load_text(args.ppl)
    for label, fields in todo:
        if label in read_results(path, protocol)["rows"]:  # done meanwhile by another process
            continue
        model, _ = load_model(args.model, dtype=torch.float32)
        model.eval()
        blocks = block_parameters(model)
        row: dict = {"config": None, "prune_seconds": 0.0}
        if label != "dense":
            cfg = PruneConfig(**fields, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
            t0 = time.perf_counter()
            result = prune(model, cfg, tokenizer=tok, calibration=windows, progress=False)
            row["prune_seconds"] = round(time.perf_counter() - t0, 1)
            row["config"] = result.config.to_dict()
        row["block_removed"] = 1 - block_parameters(model) / blocks
        row["ppl"] = perplexity(model, tok, wikitext, seq_len=args.ppl_seq_len, max_tokens=args.max_tokens,
                                progress=False).ppl
        row["held_out_ppl"] = held_out_ppl(model, held)
        add_row(path, protocol, label, row)
        print(f"{label}: PPL {row['ppl']:.2f}, held-out {row['held_out_ppl']:.2f}, "
              f"{row['block_removed']:.1%} of block params, {row['prune_seconds']:.0f} s", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
