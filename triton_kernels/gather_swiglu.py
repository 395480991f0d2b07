"""Gather GEMV with fused SwiGLU, for dynamic FFN neuron skipping.

For a Llama-style MLP ``down(silu(gate(x)) * up(x))`` with intermediate size I and hidden size H,
only a selected set of neurons ``idx`` (int32/int64, length M <= I, any order, no duplicates
assumed) is evaluated:

    a[b, m] = silu(x[b] . Wg[idx[m]]) * (x[b] . Wu[idx[m]])          m = 0..M-1
    y[b, h] = sum_m a[b, m] * Wd[h, idx[m]]

Layouts: ``w_gate``, ``w_up`` are the nn.Linear weights ``[I, H]`` (row i = neuron i, contiguous);
``w_down_t`` is the **transposed** down weight ``Wd.T.contiguous()`` of shape ``[I, H]`` so that
neuron i's down column is also one contiguous row. Skipping a neuron therefore skips three
contiguous rows of ``H`` elements; with M = I/2 half the MLP bytes are read.

Kernel design (two kernels + split-K reduction)
-----------------------------------------------
1. ``_gather_gate_up_kernel``: grid = cdiv(M, BLOCK_M). Each program loads BLOCK_M row indices,
   streams the gathered gate and up rows in ``[BLOCK_M, BLOCK_H]`` tiles (each row contiguous:
   coalesced), accumulates both dot products in fp32 and applies ``silu(g) * u`` in registers
   before writing ``a`` (fp32 workspace [B, M]). No split over H: the non-linearity needs the full
   sum, and M/BLOCK_M programs already fill the GPU at LLM sizes.
2. ``_gather_down_kernel``: grid = (cdiv(H, BLOCK_N), SPLIT_K) over output columns and the
   selected neurons; loads gathered rows of ``w_down_t`` (coalesced along H), fp32 accumulation;
   split-K partials reduced in a second pass (no atomics, deterministic).

Tolerances used by the tests (vs ``gather_swiglu_reference``, fp32 math throughout, output cast
to x.dtype): fp32 atol=rtol=1e-4; fp16 atol=rtol=1e-2; bf16 (GPU only) atol=rtol=3e-2.
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

__all__ = ["gather_swiglu", "gather_swiglu_reference"]


def gather_swiglu_reference(x, w_gate, w_up, w_down_t, idx) -> torch.Tensor:
    """Plain PyTorch reference (fp32 math, output in x.dtype). Shapes as ``gather_swiglu``."""
    idx = idx.long()
    xf = x.float()
    g = xf @ w_gate[idx].float().t()
    u = xf @ w_up[idx].float().t()
    a = torch.nn.functional.silu(g) * u
    return (a @ w_down_t[idx].float()).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _gather_gate_up_kernel(
        x_ptr, wg_ptr, wu_ptr, idx_ptr, a_ptr,
        B, M, H,
        stride_xb, stride_wg, stride_wu,
        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        rows = tl.load(idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        offs_b = tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        acc_g = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_h[None, :],
                        mask=b_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
            w_mask = m_mask[:, None] & h_mask[None, :]
            wg = tl.load(wg_ptr + rows[:, None] * stride_wg + offs_h[None, :], mask=w_mask, other=0.0).to(tl.float32)
            wu = tl.load(wu_ptr + rows[:, None] * stride_wu + offs_h[None, :], mask=w_mask, other=0.0).to(tl.float32)
            acc_g += tl.sum(x[:, None, :] * wg[None, :, :], axis=2)
            acc_u += tl.sum(x[:, None, :] * wu[None, :, :], axis=2)
        a = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(a_ptr + offs_b[:, None] * M + offs_m[None, :], a, mask=b_mask[:, None] & m_mask[None, :])

    @triton.jit
    def _gather_down_kernel(
        a_ptr, wd_ptr, idx_ptr, out_ptr,
        B, M, H, M_PER_SPLIT,
        stride_wd, stride_ob,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
        WRITE_PARTIAL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        offs_b = tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        m_start = pid_k * M_PER_SPLIT
        m_end = tl.minimum(m_start + M_PER_SPLIT, M)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < m_end
            rows = tl.load(idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
            a = tl.load(a_ptr + offs_b[:, None] * M + offs_m[None, :],
                        mask=b_mask[:, None] & m_mask[None, :], other=0.0)
            w = tl.load(wd_ptr + rows[:, None] * stride_wd + offs_n[None, :],
                        mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
        store_tile(out_ptr, acc, pid_k, offs_b, offs_n, b_mask, n_mask, B, H, stride_ob, WRITE_PARTIAL)


def _default_blocks(bb: int, device: torch.device):
    """(BLOCK_M gate/up, BLOCK_H gate/up, BLOCK_N down, BLOCK_M down, num_warps)."""
    if device.type == "cuda":
        return 16, max(64, 256 // bb), 128, max(16, 128 // bb), (4 if bb <= 2 else 8)
    return 16, 32, 64, 16, 4


def gather_swiglu(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    *,
    split_k: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton launcher. x: [B, H] or [H]; w_gate, w_up: [I, H]; w_down_t: [I, H] (= down.weight.T);
    idx: int32/int64 [M] neuron indices in [0, I). Returns [B, H] (or [H]) in x.dtype."""
    op = "gather_swiglu"
    require_triton(op)
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    check_tensor(op, "x", x, 2)
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        check_tensor(op, name, t, 2)
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} ({t.dtype}) must have the dtype of x ({x.dtype})")
    check_tensor(op, "idx", idx, 1, dtypes=(torch.int32, torch.int64))
    B, H = x.shape
    I = w_gate.shape[0]
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        if tuple(t.shape) != (I, H):
            raise ValueError(f"{op}: {name} must be [I={I}, H={H}], got {tuple(t.shape)} (w_down_t is down.weight.T)")
    dev = check_device(op, ("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t), ("idx", idx))
    x, w_gate, w_up, w_down_t = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w_gate, w_up, w_down_t))
    idx = idx.contiguous()
    M = idx.numel()
    out = torch.empty((B, H), dtype=x.dtype, device=dev)
    if B == 0 or H == 0:
        return out.squeeze(0) if squeeze else out
    if M == 0:
        out.zero_()
        return out.squeeze(0) if squeeze else out

    for b0 in range(0, B, MAX_BATCH):
        xb = x[b0:b0 + MAX_BATCH]
        ob = out[b0:b0 + MAX_BATCH]
        nb = xb.shape[0]
        bb = pow2_at_least(nb)
        bm1, bh1, bn2, bm2, nw = _default_blocks(bb, dev)
        nw = num_warps or nw
        a = torch.empty((nb, M), dtype=torch.float32, device=dev)
        _gather_gate_up_kernel[(triton.cdiv(M, bm1),)](
            xb, w_gate, w_up, idx, a, nb, M, H,
            xb.stride(0), w_gate.stride(0), w_up.stride(0),
            BLOCK_B=bb, BLOCK_M=bm1, BLOCK_H=bh1, num_warps=nw,
        )
        n_tiles = triton.cdiv(H, bn2)
        sk, m_per = pick_split(n_tiles, M, bm2, dev, split_k)
        grid = (n_tiles, sk)
        if sk == 1:
            _gather_down_kernel[grid](
                a, w_down_t, idx, ob, nb, M, H, m_per, w_down_t.stride(0), ob.stride(0),
                BLOCK_B=bb, BLOCK_N=bn2, BLOCK_M=bm2, WRITE_PARTIAL=False, num_warps=nw,
            )
        else:
            partial = torch.empty((sk, nb, H), dtype=torch.float32, device=dev)
            _gather_down_kernel[grid](
                a, w_down_t, idx, partial, nb, M, H, m_per, w_down_t.stride(0), H,
                BLOCK_B=bb, BLOCK_N=bn2, BLOCK_M=bm2, WRITE_PARTIAL=True, num_warps=nw,
            )
            splitk_reduce(partial, ob)  # ob is a row slice of a contiguous [B, H]: contiguous
    return out.squeeze(0) if squeeze else out
