"""Shared helpers for the kernels in this package: optional Triton import, argument checks,
split-K sizing and the deterministic second-pass split-K reduction.

Split-K without atomics
-----------------------
All GEMV kernels here are memory bound at batch 1-8. To keep every SM streaming weights, the
reduction dimension is split over ``SPLIT_K`` programs. Partial sums are written in fp32 to a
workspace ``partial[SPLIT_K, B, N]`` and a second tiny kernel sums over the split axis and casts
to the output dtype. This avoids bf16/fp16 atomics entirely (not available / not deterministic)
and gives bit-identical results run to run. With ``SPLIT_K == 1`` the main kernel stores the
output directly and the second pass is skipped.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the references (and llmprune.runtime) work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised in a subprocess test
    triton = None
    tl = None
    HAS_TRITON = False

#: dtypes the kernels accept. bf16 is GPU only (the interpreter's bf16 numerics are wrong).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: largest batch (number of rows of x) handled by one GEMV launch; larger inputs are chunked.
MAX_BATCH = 8


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: Triton is not installed; use {op}_reference instead")


def check_tensor(op: str, name: str, t, ndim: int, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected one of {dtypes}")


def check_device(op: str, *named) -> torch.device:
    devs = {t.device for _, t in named}
    if len(devs) != 1:
        desc = ", ".join(f"{n}={t.device}" for n, t in named)
        raise ValueError(f"{op}: all tensors must be on one device, got {desc}")
    dev = devs.pop()
    if dev.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"{op}: tensors are on {dev}; the Triton kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 for the CPU interpreter). Use the *_reference function on CPU."
        )
    return dev


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: keep the grid tiny


def pick_split(n_tiles: int, k_len: int, block_k: int, device: torch.device, split_k=None):
    """Return (split_k, k_per_split). ``k_per_split`` is a multiple of ``block_k``.

    Heuristic: aim for ~2 programs per SM (enough loads in flight to saturate HBM), but never
    give a split less than 4 blocks of work (otherwise the reduction pass dominates)."""
    k_blocks = triton.cdiv(k_len, block_k)
    if split_k is None:
        target = 2 * num_sms(device)
        split_k = max(1, min(target // max(n_tiles, 1), k_blocks // 4))
    split_k = max(1, min(int(split_k), k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k_len, k_per_split)  # drop empty splits
    return split_k, k_per_split


def pow2_at_least(n: int, lo: int = 1) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


if HAS_TRITON:

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, out_ptr, numel, SPLIT_K, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, SPLIT_K):
            acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def store_tile(out_ptr, acc, pid_k, offs_b, offs_n, b_mask, n_mask, B, N, stride_ob,
                   WRITE_PARTIAL: tl.constexpr):
        """Epilogue shared by the GEMV kernels: a ``[BLOCK_B, BLOCK_N]`` fp32 tile goes either to the
        split-K workspace ``[SPLIT_K, B, N]`` (reduced later by ``splitk_reduce``) or, cast, to the output."""
        out_mask = b_mask[:, None] & n_mask[None, :]
        if WRITE_PARTIAL:
            tl.store(out_ptr + pid_k * B * N + offs_b[:, None] * N + offs_n[None, :], acc, mask=out_mask)
        else:
            tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=out_mask)

else:  # pragma: no cover - kernels are not defined without Triton
    store_tile = None


def splitk_reduce(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[...] = partial.sum(0) (fp32 sum, cast to out.dtype). ``out`` must be contiguous."""
    split_k = partial.shape[0]
    numel = out.numel()
    block = 1024 if partial.device.type == "cuda" else 256
    grid = (triton.cdiv(numel, block),)
    _splitk_reduce_kernel[grid](partial, out, numel, split_k, BLOCK=block)
    return out
