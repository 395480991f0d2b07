#!/usr/bin/env python
"""Benchmark the llmprune Triton kernels against dense torch.matmul (cuBLAS).

GPU (default): LLM shapes 4096x4096, 4096->14336, 14336->4096 (in->out), batch 1/4/8,
activation sparsity 0-90%; reports median time (triton.testing.do_bench), achieved GB/s
(= bytes the kernel actually has to read / time) and % of peak HBM bandwidth, plus the speed-up
over dense. Then end-to-end greedy decode tokens/s of a random-weight Llama-7B-shaped model,
dense vs activation-sparse vs 2:4.

    python scripts/bench_kernels.py --out-json bench.json --out-md bench.md
    python scripts/bench_kernels.py --layers 8 --e2e-tokens 64          # smaller e2e model
    python scripts/bench_kernels.py --smoke                             # tiny CPU run (interpreter)

``--smoke`` uses tiny shapes; without CUDA it sets TRITON_INTERPRET=1 and times the Triton
interpreter (numbers are meaningless, it only proves the script runs end to end).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

PEAK_GBPS = [  # (substring of torch.cuda.get_device_name, GB/s); first match wins
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM / HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("RTX 4090", 1008.0),
    ("A10G", 600.0),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU through the Triton interpreter")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batches", default=None, help="comma list, default 1,4,8")
    p.add_argument("--sparsities", default=None, help="comma list of activation sparsities, default 0,0.25,0.5,0.7,0.9")
    p.add_argument("--shapes", default=None, help="comma list of INxOUT, default 4096x4096,4096x14336,14336x4096")
    p.add_argument("--ops", default="act,24,gather", help="subset of act,24,gather")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth; default from a GPU-name table")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode benchmark")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the e2e model (default 32; smoke 2)")
    p.add_argument("--e2e-tokens", type=int, default=None, help="new tokens per e2e run (default 128; smoke 4)")
    p.add_argument("--e2e-sparsity", type=float, default=0.5, help="activation sparsity of the e2e sparse model")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    return p.parse_args(argv)


ARGS = parse_args()
import torch  # noqa: E402

if not torch.cuda.is_available():
    if not ARGS.smoke:
        sys.exit("bench_kernels.py: no CUDA device; use --smoke for a CPU interpreter run")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llmprune.kernels as tk  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[ARGS.dtype]
if DEV.type == "cpu" and DT == torch.bfloat16:
    sys.exit("bf16 is GPU only (the interpreter's bf16 numerics are wrong)")
E = torch.finfo(DT).bits // 8


def timer(fn) -> float:
    """Median milliseconds."""
    if DEV.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def gpu_name() -> str:
    return torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, Triton interpreter)"


def peak_gbps() -> float | None:
    if ARGS.peak_gbps:
        return ARGS.peak_gbps
    if DEV.type != "cuda":
        return None
    name = gpu_name()
    for key, v in PEAK_GBPS:
        if key in name:
            return v
    return None


def threshold_for(x: torch.Tensor, s: float) -> float:
    if s <= 0:
        return 0.0
    a = x.float().abs().flatten()
    return float(a.kthvalue(max(1, round(s * a.numel()))).values)


def row(op, K, N, B, sparsity, t_kernel, t_dense, nbytes, peak, note=""):
    gbps = nbytes / (t_kernel * 1e-3) / 1e9
    return {
        "op": op, "in": K, "out": N, "batch": B, "sparsity": sparsity,
        "kernel_ms": round(t_kernel, 5), "dense_ms": round(t_dense, 5),
        "speedup": round(t_dense / t_kernel, 3), "bytes_read": int(nbytes),
        "gbps": round(gbps, 1), "pct_peak": None if peak is None else round(100 * gbps / peak, 1), "note": note,
    }


def bench_kernels(shapes, batches, sparsities, ops, peak):
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for K, N in shapes:
        W = (torch.randn(N, K, generator=g) / K**0.5).to(DT).to(DEV)
        W_t = W.t().contiguous()
        vals, meta = tk.compress_24(W)
        for B in batches:
            x = torch.randn(B, K, generator=g).to(DT).to(DEV)
            io_bytes = (B * K + B * N) * E
            t_dense = timer(lambda: torch.matmul(x, W.t()))
            rows.append(row("dense", K, N, B, 0.0, t_dense, t_dense, K * N * E + io_bytes, peak, "torch.matmul"))
            if "act" in ops:
                for s in sparsities:
                    t = threshold_for(x, s)
                    live = (x.abs() > t).any(0).float().mean().item()  # rows that must be read
                    tk_ms = timer(lambda: tk.act_sparse_gemv(x, W_t, t))
                    rows.append(row("act_sparse_gemv", K, N, B, s, tk_ms, t_dense, live * K * N * E + io_bytes, peak,
                                    f"live rows {live:.2f}"))
            if "24" in ops and K % 4 == 0:
                t24 = timer(lambda: tk.sparse24_gemm(x, vals, meta))
                rows.append(row("sparse24_gemm", K, N, B, 0.5, t24, t_dense,
                                vals.numel() * E + meta.numel() + io_bytes, peak, "2:4 weights"))
        del W, W_t, vals, meta
    if "gather" in ops:
        # FFN of the first shape family: hidden = in of the first shape, intermediate = largest out
        H = shapes[0][0]
        I = max(n for _, n in shapes)
        wg = (torch.randn(I, H, generator=g) / H**0.5).to(DT).to(DEV)
        wu = (torch.randn(I, H, generator=g) / H**0.5).to(DT).to(DEV)
        wd = (torch.randn(H, I, generator=g) / I**0.5).to(DT).to(DEV)
        wd_t = wd.t().contiguous()
        for B in batches:
            x = torch.randn(B, H, generator=g).to(DT).to(DEV)

            def dense_mlp():
                return torch.matmul(torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t()), wd.t())

            t_dense = timer(dense_mlp)
            rows.append(row("dense_mlp", H, I, B, 0.0, t_dense, t_dense, 3 * I * H * E, peak, "3 x torch.matmul"))
            for s in sparsities:
                M = max(1, round((1 - s) * I))
                idx = torch.randperm(I, generator=g)[:M].sort().values.to(torch.int32).to(DEV)
                tg = timer(lambda: tk.gather_swiglu(x, wg, wu, wd_t, idx))
                rows.append(row("gather_swiglu", H, I, B, s, tg, t_dense, 3 * M * H * E + B * (H + M) * 4, peak,
                                f"kept {M}/{I} neurons"))
        del wg, wu, wd, wd_t
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_e2e(layers, tokens, sparsity):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprune import runtime as sp

    if ARGS.smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=layers, vocab_size=512, max_position_embeddings=256)
    else:  # Llama-2-7B shapes
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEV):
        base = LlamaForCausalLM(cfg).to(DT).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=DEV)
    if DEV.type == "cpu":
        sp.set_backend("kernel")  # run the Triton kernels through the interpreter

    def decode_tps(model):
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(prompt, **kw)  # warm-up / compile
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(prompt, **kw)
            if DEV.type == "cuda":
                torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t0)

    res = {"model": f"random Llama-7B shapes, {layers} layers" if not ARGS.smoke else f"tiny Llama, {layers} layers",
           "dtype": ARGS.dtype, "new_tokens": tokens}
    res["dense_tok_s"] = round(decode_tps(base), 2)
    names = sp.find_targets(base, sp.KernelConfig())
    with torch.no_grad():
        thresholds = sp.calibrate_thresholds(base, [prompt], sparsity)
    import copy

    act = sp.use_kernels(copy.deepcopy(base), sp.KernelConfig(thresholds=thresholds))
    res[f"act_sparse_{int(sparsity * 100)}_tok_s"] = round(decode_tps(act), 2)
    del act
    s24 = sp.use_kernels(base, sp.KernelConfig(weight_24=True, thresholds={n: 0.0 for n in names}))
    res["sparse24_tok_s"] = round(decode_tps(s24), 2)
    return res


def to_markdown(meta, rows, e2e) -> str:
    out = [f"## Kernel benchmarks: {meta['device']}", "",
           f"dtype {meta['dtype']}, peak bandwidth {meta['peak_gbps'] or 'n/a'} GB/s, torch {meta['torch']}, "
           f"triton {meta['triton']}. Time = median of triton.testing.do_bench; GB/s = bytes the kernel must read "
           "(live weight rows / kept neurons / compressed values+meta, plus x and y) / time.", "",
           "| op | in | out | batch | sparsity | kernel ms | dense ms | speed-up | GB/s | % peak | note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['in']} | {r['out']} | {r['batch']} | {r['sparsity']:.2f} | {r['kernel_ms']:.4f} | "
                   f"{r['dense_ms']:.4f} | {r['speedup']:.2f} | {r['gbps']:.1f} | "
                   f"{'n/a' if r['pct_peak'] is None else r['pct_peak']} | {r['note']} |")
    if e2e:
        out += ["", f"### End-to-end decode ({e2e['model']}, {e2e['dtype']}, batch 1, {e2e['new_tokens']} new tokens, "
                "HF generate, eager)", "", "| variant | tokens/s |", "|---|---:|"]
        for k, v in e2e.items():
            if k.endswith("_tok_s"):
                out.append(f"| {k[:-6]} | {v} |")
    return "\n".join(out) + "\n"


def main():
    import triton

    smoke = ARGS.smoke
    batches = [int(b) for b in (ARGS.batches or ("1,4" if smoke else "1,4,8")).split(",")]
    sparsities = [float(s) for s in (ARGS.sparsities or ("0,0.5,0.9" if smoke else "0,0.25,0.5,0.7,0.9")).split(",")]
    shapes_s = ARGS.shapes or ("256x256,256x512,512x256" if smoke else "4096x4096,4096x14336,14336x4096")
    shapes = [tuple(int(v) for v in s.split("x")) for s in shapes_s.split(",")]
    ops = set(ARGS.ops.split(","))
    peak = peak_gbps()
    meta = {"device": gpu_name(), "dtype": ARGS.dtype, "peak_gbps": peak, "torch": torch.__version__,
            "triton": triton.__version__, "smoke": smoke}
    print(f"# device: {meta['device']}  dtype: {ARGS.dtype}  peak: {peak} GB/s", flush=True)
    rows = bench_kernels(shapes, batches, sparsities, ops, peak)
    hdr = f"{'op':<16}{'in':>6}{'out':>7}{'B':>3}{'spars':>7}{'kern ms':>10}{'dense ms':>10}{'speedup':>9}{'GB/s':>9}{'%peak':>7}  note"
    print(hdr)
    for r in rows:
        pct = "n/a" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}"
        print(f"{r['op']:<16}{r['in']:>6}{r['out']:>7}{r['batch']:>3}{r['sparsity']:>7.2f}{r['kernel_ms']:>10.4f}"
              f"{r['dense_ms']:>10.4f}{r['speedup']:>9.2f}{r['gbps']:>9.1f}{pct:>7}  {r['note']}", flush=True)
    e2e = None
    if not ARGS.no_e2e:
        layers = ARGS.layers or (2 if smoke else 32)
        tokens = ARGS.e2e_tokens or (4 if smoke else 128)
        e2e = bench_e2e(layers, tokens, ARGS.e2e_sparsity)
        print("# e2e decode:", json.dumps(e2e), flush=True)
    if ARGS.out_json:
        with open(ARGS.out_json, "w") as f:
            json.dump({"meta": meta, "kernels": rows, "e2e": e2e}, f, indent=2)
    if ARGS.out_md:
        with open(ARGS.out_md, "w") as f:
            f.write(to_markdown(meta, rows, e2e))


if __name__ == "__main__":
    main()
