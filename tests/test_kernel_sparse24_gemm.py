"""2:4 compress/decompress and sparse24_gemm vs its PyTorch reference.

Kernel runs in the CPU interpreter (TRITON_INTERPRET=1) or on CUDA. Tolerances (fp32
accumulation on both sides): fp32 atol=rtol=1e-4, fp16 atol=rtol=1e-2, bf16 (GPU only) 3e-2.
"""
import pytest
import torch

from kernel_common import DEV, TOL, gpu_only, needs_kernels, tk


def _case(B, K, N, dtype, device=DEV, seed=0, act_sparsity=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    values, meta = tk.compress_24(w)
    t = None
    if act_sparsity is not None:
        a = x.float().abs().flatten()
        t = 0.0 if act_sparsity == 0 else float(a.kthvalue(max(1, round(act_sparsity * a.numel()))).values)
    return x, w, values, meta, t


def _check(y, r, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(y.float().cpu(), r.float().cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("N,K", [(5, 4), (7, 12), (33, 96), (3, 260)])
def test_compress_roundtrip_and_layout(N, K):
    w = torch.randn(N, K)
    values, meta = tk.compress_24(w)
    assert values.shape == (N, K // 2) and meta.shape == (N, (K + 7) // 8) and meta.dtype == torch.uint8
    dense = tk.decompress_24(values, meta)
    m = tk.mask_24(w)
    assert torch.equal(dense, w * m)
    assert (m.reshape(N, -1, 4).sum(-1) == 2).all()  # exactly 2 of every 4 kept
    assert tk.is_24_sparse(dense) and not tk.is_24_sparse(w)
    # lossless on an already-2:4 weight, strict mode accepts it and rejects a dense one
    v2, m2 = tk.compress_24(dense, strict=True)
    assert torch.equal(tk.decompress_24(v2, m2), dense)
    with pytest.raises(ValueError):
        tk.compress_24(w, strict=True)


def test_meta_bit_layout_documented():
    # row [0, a, 0, b | c, 0, 0, d]: positions (1, 3) and (0, 3) -> codes 1,3,0,3 -> 0b11_00_11_01
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    values, meta = tk.compress_24(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert meta.tolist() == [[0b11001101]]


def test_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 4"):
        tk.compress_24(torch.randn(4, 10))
    v, m = tk.compress_24(torch.randn(4, 16))
    with pytest.raises(ValueError, match="meta"):
        tk.decompress_24(v, m[:, :1])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,K,N", [(1, 96, 333), (3, 204, 130), (8, 260, 97)])
def test_matches_reference(B, K, N, dtype):
    x, w, values, meta, _ = _case(B, K, N, dtype)
    y = tk.sparse24_gemm(x, values, meta)
    r = tk.sparse24_gemm_reference(x, values, meta)
    assert y.shape == (B, N) and y.dtype == dtype
    _check(y, r, dtype)
    _check(r, (x.float() @ (w * tk.mask_24(w)).float().t()).to(dtype), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act_sparsity", [0.0, 0.5, 0.9, 1.0])
def test_fused_threshold(act_sparsity, dtype):
    x, w, values, meta, t = _case(4, 132, 77, dtype, act_sparsity=act_sparsity, seed=1)
    y = tk.sparse24_gemm(x, values, meta, t)
    _check(y, tk.sparse24_gemm_reference(x, values, meta, t), dtype)
    if act_sparsity == 1.0:
        assert torch.count_nonzero(y) == 0


@needs_kernels
@pytest.mark.parametrize("split_k", [1, 3])
def test_split_k_batch_chunks_vector(split_k):
    x, w, values, meta, _ = _case(10, 200, 64, torch.float32, seed=2)
    r = tk.sparse24_gemm_reference(x, values, meta)
    _check(tk.sparse24_gemm(x, values, meta, split_k=split_k, block_n=16, block_j=16), r, torch.float32)
    _check(tk.sparse24_gemm(x[3], values, meta, split_k=split_k), r[3], torch.float32)


@needs_kernels
def test_argument_errors():
    x, w, values, meta, _ = _case(2, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="K/2"):
        tk.sparse24_gemm(x[:, :16], values, meta)
    with pytest.raises(TypeError, match="uint8"):
        tk.sparse24_gemm(x, values, meta.int())
    with pytest.raises(TypeError, match="same dtype"):
        tk.sparse24_gemm(x.half(), values, meta)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 8])
def test_sweep_slow(B, dtype):
    x, w, values, meta, _ = _case(B, 516, 771, dtype, seed=B)
    _check(tk.sparse24_gemm(x, values, meta), tk.sparse24_gemm_reference(x, values, meta), dtype)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 4, 8])
def test_gpu_llm_shapes(B, dtype):
    for K, N in [(4096, 4096), (4096, 14336), (14336, 4096), (4092, 1001)]:
        x, w, values, meta, _ = _case(B, K, N, dtype, device="cuda")
        _check(tk.sparse24_gemm(x, values, meta), tk.sparse24_gemm_reference(x, values, meta), dtype)
