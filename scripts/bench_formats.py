"""Sparse checkpoint formats on a real model: size on disk and a fresh-process reload (BENCHMARKS.md,
"Sparse checkpoint formats"). Writes small text/JSON results only (never weights) to ``bench/formats/``.

    python scripts/bench_formats.py [--out-root /tmp/llmprune-formats]

For 50% unstructured and 2:4 magnitude sparsity of SmolLM2-135M-Instruct (fp32, ``scripts/real_model.py``):

* ``dense``: ``save_pretrained`` safetensors with zeros (what ``llmprune sparsify`` writes);
* ``llmprune-sparse`` (2:4 only): ``use_kernels(KernelConfig(weight_24=True))`` + ``save_compressed``, the
  format ``Sparse24Linear`` and the Triton kernel run from;
* ``sparse-bitmask`` / ``sparse-24-bitmask`` (compressed-tensors): *computed* from the format's tensor layout,
  not written: compressed-tensors >= 0.15 has no sparse compressor left and transformers >= 5 does not read
  ``sparsity_config`` (see README, "Sparse checkpoint formats").

Each written folder is reloaded in a fresh Python process (plain ``AutoModelForCausalLM.from_pretrained`` for
``dense``, ``llmprune.runtime.load_compressed`` for ``llmprune-sparse``) and its logits on a fixed batch are
compared with the in-memory model's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

RELOAD = r"""
import sys, torch
path, kind, ref = sys.argv[1:4]
if kind == "dense":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False)
else:
    from llmprune.runtime import load_compressed, set_backend
    set_backend("reference")
    model = load_compressed(path)
saved = torch.load(ref)
with torch.no_grad():
    got = model.eval()(input_ids=saved["ids"]).logits
print(float((got - saved["logits"]).abs().max()), "llmprune" in sys.modules)
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def bitmask_bytes(model: torch.nn.Module, two_four: bool) -> int:
    """Bytes a compressed-tensors sparse checkpoint of ``model`` would hold: per sparsified Linear weight
    [out, in] the packed bitmask (out * ceil(in/8) bytes) and the non-zero values, plus for ``sparse-bitmask``
    int64 row offsets and the int shape; every other tensor dense (tied weights once)."""
    seen, total = set(), 0
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.")}
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        if name in linear:
            out, inp = t.shape
            nnz = int(torch.count_nonzero(t))
            total += out * ((inp + 7) // 8) + nnz * t.element_size() + (0 if two_four else out * 8 + 2 * 8)
        else:
            total += t.numel() * t.element_size()
    return total


def reload(path: Path, kind: str, ref: Path) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", RELOAD, str(path), kind, str(ref)], capture_output=True, text=True,
                         check=True)
    diff, imported = out.stdout.split()[-2:]
    return {"max_abs_logit_diff": float(diff), "imports_llmprune": imported == "True", "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-root", default="/tmp/llmprune-formats")
    args = ap.parse_args()
    from real_model import real_model_path

    from llmprune import load_model, save_pruned
    from llmprune.runtime import KernelConfig, save_compressed, set_backend, use_kernels
    from llmprune.sparsity import SparsityConfig, sparsify

    src = Path(real_model_path())
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    results = {"model": "SmolLM2-135M-Instruct (fp32)", "source_bytes": folder_bytes(src), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "rows": []}
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    for pattern in ("unstructured", "2:4"):
        model, tok = load_model(str(src), dtype="float32")
        sparsify(model, SparsityConfig(method="magnitude", sparsity=0.5, pattern=pattern), progress=False)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        ref = root / f"ref-{pattern.replace(':', '')}.pt"
        torch.save({"ids": ids, "logits": logits}, ref)
        tag = "50" if pattern == "unstructured" else "24"
        dense = root / f"smollm2-{tag}-dense"
        save_pruned(model, dense, tokenizer=tok, source=str(src), overwrite=True)
        cfg = json.loads((dense / "config.json").read_text())
        results["rows"].append({"pattern": pattern, "format": "dense", "written": True, "bytes": folder_bytes(dense),
                                "reload": reload(dense, "dense", ref),
                                "config_quantization_config": cfg.get("quantization_config"),
                                "config_keys": sorted(cfg)})
        ct = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
        results["rows"].append({"pattern": pattern, "format": f"compressed-tensors {ct}", "written": False,
                                "bytes": bitmask_bytes(model, pattern == "2:4"), "reload": None})
        if pattern == "2:4":
            set_backend("reference")
            use_kernels(model, KernelConfig(weight_24=True))
            kern = root / "smollm2-24-llmprune-sparse"
            save_compressed(model, kern, overwrite=True)
            results["rows"].append({"pattern": pattern, "format": "llmprune-sparse (save_compressed)", "written": True,
                                    "bytes": folder_bytes(kern), "reload": reload(kern, "llmprune", ref)})
        del model
    for r in results["rows"]:
        r["vs_dense"] = round(r["bytes"] / next(x["bytes"] for x in results["rows"]
                                                 if x["pattern"] == r["pattern"] and x["format"] == "dense"), 3)
    out = ROOT / "bench" / "formats"
    out.mkdir(parents=True, exist_ok=True)
    (out / "formats.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results["rows"]:
        rl = r["reload"]
        print(f"{r['pattern']:>12} {r['format']:<36} {r['bytes'] / 1e6:8.1f} MB  x{r['vs_dense']:.3f}  "
              f"{'reload max|dlogit| %.3g (imports llmprune: %s)' % (rl['max_abs_logit_diff'], rl['imports_llmprune']) if rl else 'not written (computed)'}")


if __name__ == "__main__":
    main()
