"""Activation-sparse GEMV (TEAL-style dynamic activation sparsity).

    y[b, n] = sum_k  s(x[b, k]) * W[n, k],   s(v) = v if |v| > threshold else 0

Layout: the weight is passed **column-major**, i.e. as ``w_t = W.T.contiguous()`` of shape
``[K, N]``. Input feature ``k`` then owns one contiguous row ``w_t[k, :]``; when ``x[:, k]`` is
zeroed by the threshold the whole row is never read. That is where the speed-up comes from: at
batch 1 decode a linear layer is memory bound, and at 50% activation sparsity half the weight
bytes are skipped.

Kernel design
-------------
* grid = (cdiv(N, BLOCK_N), SPLIT_K). Program (pn, pk) owns output columns
  ``[pn*BLOCK_N, +BLOCK_N)`` and reduction rows ``[pk*K_PER_SPLIT, +K_PER_SPLIT)``.
* Per step it loads the ``[BLOCK_B, BLOCK_K]`` input tile, applies the threshold in registers
  (fused: no thresholded copy of x is ever written), and computes per row ``live[k] = any_b
  (x[b, k] != 0)``.
* If no row of the block is live, the whole ``[BLOCK_K, BLOCK_N]`` weight tile is skipped (a real
  branch). Otherwise the weight tile is loaded with ``mask = live[:, None]``: predicated-off rows
  issue no memory transactions, so dead rows inside a live block are skipped too. Each live row is
  a contiguous ``BLOCK_N * elem`` byte segment (256 B for fp16 and BLOCK_N=128): coalesced.
* Accumulation is fp32 in registers. SPLIT_K > 1 writes fp32 partials and a second pass reduces
  them (see ``_common``): no bf16/fp16 atomics, deterministic.
* Batch 1..8 is handled in one launch (``BLOCK_B`` = next power of two >= B); a row k can only be
  skipped when it is zero for *all* batch rows, so the benefit shrinks with batch. Larger batches
  are processed in chunks of 8 by the launcher (callers should use a dense GEMM for prefill).

Tolerances used by the tests (vs ``act_sparse_gemv_reference``, which also accumulates in fp32):
fp32 atol=rtol=1e-4; fp16 atol=rtol=1e-2 (output rounding + summation order); bf16 (GPU only)
atol=rtol=3e-2.
"""
from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    MAX_BATCH,
    check_device,
    check_tensor,
    pick_split,
    pow2_at_least,
    require_triton,
    splitk_reduce,
    store_tile,
    tl,
    triton,
)

__all__ = ["act_sparse_gemv", "act_sparse_gemv_reference", "threshold_activations"]


def threshold_activations(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero every entry with ``|x| <= threshold`` (comparison in fp32, like the kernel)."""
    keep = x.float().abs() > float(threshold)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def act_sparse_gemv_reference(x: torch.Tensor, w_t: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Plain PyTorch reference: ``threshold(x) @ w_t`` accumulated in fp32, cast to x.dtype.

    x: [B, K] (or [K]); w_t: [K, N] (the transposed nn.Linear weight). Returns [B, N] (or [N])."""
    xs = threshold_activations(x, threshold)
    return (xs.float() @ w_t.float()).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _act_sparse_gemv_kernel(
        x_ptr, w_ptr, out_ptr,
        B, N, K, K_PER_SPLIT, threshold,
        stride_xb, stride_wk, stride_ob,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        WRITE_PARTIAL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_b = tl.arange(0, BLOCK_B)
        b_mask = offs_b < B

        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        # batch 1: element-wise [BLOCK_K, BLOCK_N] accumulator, reduced once after the loop
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x = tl.load(
                x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :],
                mask=b_mask[:, None] & k_mask[None, :], other=0.0,
            ).to(tl.float32)
            keep = tl.abs(x) > threshold
            x = tl.where(keep, x, 0.0)
            live = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: row k needed by any batch row
            if tl.max(live.to(tl.int32), axis=0) > 0:  # skip the whole weight tile otherwise
                w = tl.load(
                    w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                    mask=live[:, None] & n_mask[None, :], other=0.0,
                ).to(tl.float32)
                if BLOCK_B == 1:
                    acc2 += tl.sum(x, axis=0)[:, None] * w
                else:
                    acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        if BLOCK_B == 1:
            acc += tl.sum(acc2, axis=0)[None, :]

        store_tile(out_ptr, acc, pid_k, offs_b, offs_n, b_mask, n_mask, B, N, stride_ob, WRITE_PARTIAL)


def _default_blocks(bb: int, device: torch.device):
    if device.type == "cuda":
        block_n = 128  # 256 B contiguous per weight row (fp16)
        block_k = max(8, 64 // bb)  # [BB, BK, BN] product <= 8K fp32 values (64 per thread)
        return block_n, block_k, 4
    return 64, 32, 4  # interpreter: small tiles, small grids


def act_sparse_gemv(
    x: torch.Tensor,
    w_t: torch.Tensor,
    threshold: float = 0.0,
    *,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton launcher. x: [B, K] or [K] (fp16/bf16/fp32), w_t: [K, N] same dtype with unit stride
    along N. ``threshold`` is a Python float (entries with ``|x| <= threshold`` are dropped).
    Returns [B, N] (or [N]) in x.dtype. Batches above 8 are processed in chunks of 8."""
    op = "act_sparse_gemv"
    require_triton(op)
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    check_tensor(op, "x", x, 2)
    check_tensor(op, "w_t", w_t, 2)
    if x.dtype != w_t.dtype:
        raise TypeError(f"{op}: x ({x.dtype}) and w_t ({w_t.dtype}) must have the same dtype")
    B, K = x.shape
    if w_t.shape[0] != K:
        raise ValueError(f"{op}: x is [B={B}, K={K}] but w_t is {tuple(w_t.shape)}; expected [K, N] (pass W.T)")
    dev = check_device(op, ("x", x), ("w_t", w_t))
    if w_t.stride(1) != 1:
        w_t = w_t.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    N = w_t.shape[1]
    if out is None:
        out = torch.empty((B, N), dtype=x.dtype, device=dev)
    elif out.shape != (B, N) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"{op}: out must be a [{B}, {N}] {x.dtype} tensor with unit column stride")
    if B == 0 or N == 0:
        return out.squeeze(0) if squeeze else out
    if K == 0:
        out.zero_()
        return out.squeeze(0) if squeeze else out
    threshold = float(threshold)
    if threshold != threshold or threshold < 0:
        raise ValueError(f"{op}: threshold must be a non-negative float, got {threshold}")

    for b0 in range(0, B, MAX_BATCH):
        xb = x[b0:b0 + MAX_BATCH]
        ob = out[b0:b0 + MAX_BATCH]
        nb = xb.shape[0]
        bb = pow2_at_least(nb)
        bn, bk, nw = _default_blocks(bb, dev)
        bn, bk, nw = block_n or bn, block_k or bk, num_warps or nw
        n_tiles = triton.cdiv(N, bn)
        sk, k_per = pick_split(n_tiles, K, bk, dev, split_k)
        grid = (n_tiles, sk)
        if sk == 1:
            _act_sparse_gemv_kernel[grid](
                xb, w_t, ob, nb, N, K, k_per, threshold,
                xb.stride(0), w_t.stride(0), ob.stride(0),
                BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, WRITE_PARTIAL=False, num_warps=nw,
            )
        else:
            partial = torch.empty((sk, nb, N), dtype=torch.float32, device=dev)
            _act_sparse_gemv_kernel[grid](
                xb, w_t, partial, nb, N, K, k_per, threshold,
                xb.stride(0), w_t.stride(0), N,
                BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, WRITE_PARTIAL=True, num_warps=nw,
            )
            if ob.is_contiguous():
                splitk_reduce(partial, ob)
            else:
                ob.copy_(splitk_reduce(partial, torch.empty((nb, N), dtype=x.dtype, device=dev)))
    return out.squeeze(0) if squeeze else out
