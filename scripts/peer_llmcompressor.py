#!/usr/bin/env python
"""Run llm-compressor's SparseGPT or Wanda on given calibration windows and save a plain checkpoint.

Runs *inside llm-compressor's own virtual environment* (it pins transformers <= 5.17); ``bench_quality.py``
calls it there. The windows are the exact ``input_ids`` tensor llmprune calibrates on (a safetensors file,
never a pickle), given to ``oneshot`` as a ``datasets.Dataset`` without shuffling. Writes the pruned model
(``save_compressed=False``) and ``peer_result.json`` with the wall time and peak RSS of the pruning.

    /path/to/llmc-venv/bin/python scripts/peer_llmcompressor.py --model M --calib calib.safetensors \\
        --method sparsegpt --sparsity 0.5 --pattern 2:4 --out /tmp/peer
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="safetensors file with an int64 'input_ids' [n, seq_len]")
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", help="load dtype (bench_scale.py: bfloat16, as stored)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = load_file(args.calib)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), trust_remote_code=False)
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    modifier = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    recipe = modifier(sparsity=args.sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=False)
    import llmcompressor

    (out / "peer_result.json").write_text(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1),
                                                      "llmcompressor": llmcompressor.__version__}))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(args.model, trust_remote_code=False).save_pretrained(out)


if __name__ == "__main__":
    main()
