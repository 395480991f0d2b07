"""2:4 compressed-weight GEMV / small-batch GEMM.

    y[b, n] = sum_k x[b, k] * W[n, k]   where every aligned group of 4 weights along K
                                         (W[n, 4g:4g+4]) has at most 2 non-zeros.

Compressed layout (``compress_24``)
-----------------------------------
For a weight ``W`` of shape ``[N, K]`` with ``K % 4 == 0``:

* ``values``: ``[N, K // 2]``, same dtype as W, row-major. Group ``g`` of row ``n`` contributes
  ``values[n, 2g]`` and ``values[n, 2g + 1]``, the two kept weights in increasing column order.
* ``meta``: ``[N, ceil(K / 8)]``, ``uint8``, row-major. Each kept value ``j`` (column of
  ``values``) has a 2-bit position ``p_j in {0,1,2,3}`` inside its group, so that it is
  ``W[n, 4 * (j // 2) + p_j]``. Codes are packed little-endian, four per byte:
  ``p_j = (meta[n, j // 4] >> (2 * (j % 4))) & 3``.
  One byte therefore describes two consecutive groups; when ``K % 8 == 4`` the high nibble of the
  last byte is zero padding. Within a group ``p_{2g} < p_{2g+1}``.

Bytes per weight: 2 B -> 1 B (values) + 0.125 B (meta) for fp16/bf16, i.e. 56.25% of dense; the
memory-bound ceiling on the GEMV speed-up is therefore ~1.78x.

This is a plain packed format for our own Triton kernel (not the cuSPARSELt / CUTLASS reordered
layout); ``compress_24`` picks the 2 largest-magnitude weights of every group, so compressing a
weight that is already 2:4 sparse is lossless and compressing a dense one is magnitude 2:4 pruning.

Kernel design
-------------
* grid = (cdiv(N, BLOCK_N), SPLIT_K) over output rows and compressed columns ``j``.
* Each step loads a ``[BLOCK_N, BLOCK_J]`` tile of ``values`` (row-major, contiguous along j:
  coalesced) and the matching meta bytes (the same byte serves 4 consecutive j: L1 hits), decodes
  the 2-bit positions in registers, loads the four candidate inputs ``x[b, 4*(j//2) + c]`` for
  ``c = 0..3`` (tiny, cached) and selects one per value with ``tl.where`` - the weight is never
  decompressed to memory.
* fp32 accumulation, optional fused activation threshold (so 2:4 weights can be combined with
  TEAL thresholds), split-K with the same two-pass fp32 reduction as the other kernels.

Tolerances used by the tests (vs ``sparse24_gemm_reference``, fp32 accumulation):
fp32 atol=rtol=1e-4; fp16 atol=rtol=1e-2; bf16 (GPU only) atol=rtol=3e-2.
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

__all__ = [
    "compress_24",
    "decompress_24",
    "mask_24",
    "is_24_sparse",
    "sparse24_gemm",
    "sparse24_gemm_reference",
]


def _check_24_shape(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"2:4 weights must be 2-D [N, K], got shape {tuple(w.shape)}")
    if w.shape[1] % 4 != 0:
        raise ValueError(f"2:4 needs K (= in_features) divisible by 4, got K={w.shape[1]}")


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest-|w| entries of each aligned group of 4 along dim 1
    (ties broken towards the lower column)."""
    _check_24_shape(w)
    N, K = w.shape
    g = w.detach().float().abs().reshape(N, K // 4, 4)
    idx = torch.topk(g, 2, dim=-1, sorted=False).indices
    m = torch.zeros_like(g, dtype=torch.bool)
    m.scatter_(-1, idx, True)
    return m.reshape(N, K)


def is_24_sparse(w: torch.Tensor) -> bool:
    """True if every aligned group of 4 along dim 1 has at most 2 non-zeros."""
    _check_24_shape(w)
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def compress_24(w: torch.Tensor, strict: bool = False):
    """Compress ``w`` [N, K] into ``(values [N, K/2], meta uint8 [N, ceil(K/8)])``.

    Keeps the two largest-magnitude entries of every group of 4 (lossless if ``w`` is already 2:4).
    With ``strict=True`` a weight that is not 2:4 sparse raises instead of being pruned."""
    _check_24_shape(w)
    if strict and not is_24_sparse(w):
        raise ValueError("compress_24(strict=True): weight has groups of 4 with more than 2 non-zeros")
    N, K = w.shape
    G = K // 4
    g = w.detach().reshape(N, G, 4)
    pos = torch.topk(g.float().abs(), 2, dim=-1, sorted=False).indices
    pos = torch.sort(pos, dim=-1).values  # increasing column order inside a group
    values = torch.gather(g, -1, pos).reshape(N, 2 * G).contiguous()
    codes = pos.reshape(N, 2 * G).to(torch.uint8)
    pad = (-codes.shape[1]) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(N, pad)], dim=1)
    codes = codes.reshape(N, -1, 4)
    meta = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return values, meta.contiguous()


def _unpack_positions(meta: torch.Tensor, kh: int) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=meta.device)
    codes = (meta.unsqueeze(-1) >> shifts) & 3  # [N, ceil(K/8), 4]
    return codes.reshape(meta.shape[0], -1)[:, :kh].long()


def decompress_24(values: torch.Tensor, meta: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Inverse of ``compress_24``: returns the dense [N, K] weight (K = 2 * values.shape[1])."""
    N, kh = values.shape
    K = 2 * kh if k is None else int(k)
    if K != 2 * kh or K % 4:
        raise ValueError(f"decompress_24: values {tuple(values.shape)} do not match K={K}")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (N, (K + 7) // 8):
        raise ValueError(f"decompress_24: meta must be uint8 [{N}, {(K + 7) // 8}], got {meta.dtype} {tuple(meta.shape)}")
    pos = _unpack_positions(meta, kh)
    cols = 4 * (torch.arange(kh, device=values.device) // 2) + pos  # [N, K/2]
    w = torch.zeros((N, K), dtype=values.dtype, device=values.device)
    w.scatter_(1, cols, values)
    return w


def sparse24_gemm_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Plain PyTorch reference: ``x @ decompress_24(values, meta).T`` in fp32, cast to x.dtype.
    With ``threshold`` the input is first thresholded like ``act_sparse_gemv``."""
    if threshold is not None:
        keep = x.float().abs() > float(threshold)
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    w = decompress_24(values, meta)
    return (x.float() @ w.float().t()).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _sparse24_gemm_kernel(
        x_ptr, v_ptr, m_ptr, out_ptr,
        B, N, KH, J_PER_SPLIT, threshold,
        stride_xb, stride_vn, stride_mn, stride_ob,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
        HAS_THRESHOLD: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_b = tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        row_v = offs_n[:, None].to(tl.int64) * stride_vn
        row_m = offs_n[:, None].to(tl.int64) * stride_mn

        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)  # batch 1: reduce once at the end
        j_start = pid_k * J_PER_SPLIT
        j_end = tl.minimum(j_start + J_PER_SPLIT, KH)
        for j0 in range(j_start, j_end, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_mask = offs_j < j_end
            w_mask = n_mask[:, None] & j_mask[None, :]
            vals = tl.load(v_ptr + row_v + offs_j[None, :], mask=w_mask, other=0.0).to(tl.float32)
            mbyte = tl.load(m_ptr + row_m + (offs_j // 4)[None, :], mask=w_mask, other=0).to(tl.int32)
            pos = (mbyte >> ((offs_j % 4) * 2)[None, :]) & 3  # [BLOCK_N, BLOCK_J]

            kbase = (offs_j // 2) * 4
            x_ptrs = x_ptr + offs_b[:, None] * stride_xb + kbase[None, :]
            x_mask = b_mask[:, None] & j_mask[None, :]
            x0 = tl.load(x_ptrs + 0, mask=x_mask, other=0.0).to(tl.float32)
            x1 = tl.load(x_ptrs + 1, mask=x_mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptrs + 2, mask=x_mask, other=0.0).to(tl.float32)
            x3 = tl.load(x_ptrs + 3, mask=x_mask, other=0.0).to(tl.float32)
            if HAS_THRESHOLD:
                x0 = tl.where(tl.abs(x0) > threshold, x0, 0.0)
                x1 = tl.where(tl.abs(x1) > threshold, x1, 0.0)
                x2 = tl.where(tl.abs(x2) > threshold, x2, 0.0)
                x3 = tl.where(tl.abs(x3) > threshold, x3, 0.0)
            if BLOCK_B == 1:
                y0 = tl.sum(x0, axis=0)[None, :]
                y1 = tl.sum(x1, axis=0)[None, :]
                y2 = tl.sum(x2, axis=0)[None, :]
                y3 = tl.sum(x3, axis=0)[None, :]
                xs2 = tl.where(pos == 0, y0, tl.where(pos == 1, y1, tl.where(pos == 2, y2, y3)))
                acc2 += xs2 * vals
            else:
                p = pos[None, :, :]
                xs = tl.where(
                    p == 0, x0[:, None, :],
                    tl.where(p == 1, x1[:, None, :], tl.where(p == 2, x2[:, None, :], x3[:, None, :])),
                )  # [BLOCK_B, BLOCK_N, BLOCK_J]
                acc += tl.sum(xs * vals[None, :, :], axis=2)
        if BLOCK_B == 1:
            acc += tl.sum(acc2, axis=1)[None, :]

        store_tile(out_ptr, acc, pid_k, offs_b, offs_n, b_mask, n_mask, B, N, stride_ob, WRITE_PARTIAL)


def _default_blocks(bb: int, device: torch.device):
    if device.type == "cuda":
        block_j = 64  # 128 B of fp16 values per row per step
        block_n = max(16, 128 // bb)  # [BB, BN, BJ] product <= 8K fp32 values
        return block_n, block_j, 4
    return 32, 32, 4


def sparse24_gemm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    threshold: float | None = None,
    *,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    block_n: int | None = None,
    block_j: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton launcher: ``x @ W.T`` for a 2:4 weight given as ``compress_24`` output.

    x: [B, K] or [K]; values: [N, K/2] (same dtype as x); meta: uint8 [N, ceil(K/8)].
    Optional ``threshold`` fuses TEAL activation thresholding. Returns [B, N] (or [N]).
    Intended for small batches (chunks of 8 rows per launch); use a dense GEMM for prefill."""
    op = "sparse24_gemm"
    require_triton(op)
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    check_tensor(op, "x", x, 2)
    check_tensor(op, "values", values, 2)
    check_tensor(op, "meta", meta, 2, dtypes=(torch.uint8,))
    if x.dtype != values.dtype:
        raise TypeError(f"{op}: x ({x.dtype}) and values ({values.dtype}) must have the same dtype")
    B, K = x.shape
    N, KH = values.shape
    if K % 4 or KH * 2 != K:
        raise ValueError(f"{op}: x has K={K} but values is {tuple(values.shape)}; expected [N, K/2] with K % 4 == 0")
    if tuple(meta.shape) != (N, (K + 7) // 8):
        raise ValueError(f"{op}: meta must be [{N}, {(K + 7) // 8}], got {tuple(meta.shape)}")
    dev = check_device(op, ("x", x), ("values", values), ("meta", meta))
    x = x if x.stride(1) == 1 else x.contiguous()
    values = values if values.stride(1) == 1 else values.contiguous()
    meta = meta if meta.stride(1) == 1 else meta.contiguous()
    if out is None:
        out = torch.empty((B, N), dtype=x.dtype, device=dev)
    elif out.shape != (B, N) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"{op}: out must be a [{B}, {N}] {x.dtype} tensor with unit column stride")
    if B == 0 or N == 0:
        return out.squeeze(0) if squeeze else out
    if K == 0:
        out.zero_()
        return out.squeeze(0) if squeeze else out
    has_t = threshold is not None
    t = float(threshold) if has_t else 0.0
    if has_t and (t != t or t < 0):
        raise ValueError(f"{op}: threshold must be a non-negative float, got {threshold}")

    for b0 in range(0, B, MAX_BATCH):
        xb = x[b0:b0 + MAX_BATCH]
        ob = out[b0:b0 + MAX_BATCH]
        nb = xb.shape[0]
        bb = pow2_at_least(nb)
        bn, bj, nw = _default_blocks(bb, dev)
        bn, bj, nw = block_n or bn, block_j or bj, num_warps or nw
        if bj % 4:
            raise ValueError(f"{op}: block_j must be a multiple of 4")
        n_tiles = triton.cdiv(N, bn)
        sk, j_per = pick_split(n_tiles, KH, bj, dev, split_k)
        grid = (n_tiles, sk)
        common = dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_J=bj, HAS_THRESHOLD=has_t, num_warps=nw)
        if sk == 1:
            _sparse24_gemm_kernel[grid](
                xb, values, meta, ob, nb, N, KH, j_per, t,
                xb.stride(0), values.stride(0), meta.stride(0), ob.stride(0),
                WRITE_PARTIAL=False, **common,
            )
        else:
            partial = torch.empty((sk, nb, N), dtype=torch.float32, device=dev)
            _sparse24_gemm_kernel[grid](
                xb, values, meta, partial, nb, N, KH, j_per, t,
                xb.stride(0), values.stride(0), meta.stride(0), N,
                WRITE_PARTIAL=True, **common,
            )
            if ob.is_contiguous():
                splitk_reduce(partial, ob)
            else:
                ob.copy_(splitk_reduce(partial, torch.empty((nb, N), dtype=x.dtype, device=dev)))
    return out.squeeze(0) if squeeze else out
