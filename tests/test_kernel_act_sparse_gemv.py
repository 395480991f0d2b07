"""act_sparse_gemv vs its PyTorch reference.

Runs the Triton kernel in the CPU interpreter (TRITON_INTERPRET=1) or on CUDA. Tolerances
(kernel and reference both accumulate in fp32, differences come from summation order and the
final rounding): fp32 atol=rtol=1e-4, fp16 atol=rtol=1e-2, bf16 (GPU only) atol=rtol=3e-2.
"""
import pytest
import torch

from kernel_common import DEV, TOL, gpu_only, needs_kernels, tk


def _threshold_for(x: torch.Tensor, sparsity: float) -> float:
    """Threshold giving (at least) ``sparsity`` zeros in x (100% -> max |x|)."""
    a = x.float().abs().flatten()
    if sparsity <= 0:
        return 0.0
    k = max(1, min(a.numel(), round(sparsity * a.numel())))
    return float(a.kthvalue(k).values)


def _case(B, K, N, dtype, sparsity, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to(dtype).to(device)
    w_t = (torch.randn(K, N, generator=g) / K**0.5).to(dtype).to(device)
    return x, w_t, _threshold_for(x, sparsity)


def _check(y, r, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(y.float().cpu(), r.float().cpu(), atol=tol, rtol=tol)


def test_reference_semantics():
    x = torch.tensor([[0.5, -2.0, 1.0, -0.1]])
    w_t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    y = tk.act_sparse_gemv_reference(x, w_t, threshold=0.5)  # keeps |x| > 0.5: -2.0, 1.0
    assert torch.equal(y, (-2.0 * w_t[1] + 1.0 * w_t[2]).unsqueeze(0))
    assert torch.equal(tk.act_sparse_gemv_reference(x, w_t, 0.0), x @ w_t)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("B,K,N", [(1, 96, 333), (3, 257, 130), (8, 200, 97)])
def test_matches_reference(B, K, N, dtype, sparsity):
    x, w_t, t = _case(B, K, N, dtype, sparsity)
    y = tk.act_sparse_gemv(x, w_t, t)
    r = tk.act_sparse_gemv_reference(x, w_t, t)
    assert y.shape == (B, N) and y.dtype == dtype
    _check(y, r, dtype)
    if sparsity == 1.0:
        assert torch.count_nonzero(y) == 0


@needs_kernels
@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_split_k_and_block_overrides(split_k):
    x, w_t, t = _case(5, 300, 150, torch.float32, 0.5, seed=1)
    r = tk.act_sparse_gemv_reference(x, w_t, t)
    _check(tk.act_sparse_gemv(x, w_t, t, split_k=split_k), r, torch.float32)
    _check(tk.act_sparse_gemv(x, w_t, t, split_k=split_k, block_n=32, block_k=16), r, torch.float32)


@needs_kernels
def test_skipped_rows_are_never_read():
    # NaN in every weight row whose input is thresholded away: any read would poison y (NaN * 0).
    x, w_t, t = _case(2, 128, 96, torch.float32, 0.7, seed=2)
    dead = (x.abs() <= t).all(0)
    assert dead.any()
    w_nan = w_t.clone()
    w_nan[dead] = float("nan")
    y = tk.act_sparse_gemv(x, w_nan, t)
    assert torch.isfinite(y).all()
    _check(y, tk.act_sparse_gemv_reference(x, w_t, t), torch.float32)


@needs_kernels
def test_vector_input_large_batch_and_strided():
    x, w_t, t = _case(11, 64, 48, torch.float32, 0.5, seed=3)  # 11 rows -> chunks of 8 + 3
    r = tk.act_sparse_gemv_reference(x, w_t, t)
    _check(tk.act_sparse_gemv(x, w_t, t), r, torch.float32)
    _check(tk.act_sparse_gemv(x[4], w_t, t), r[4], torch.float32)
    xs = torch.randn(3, 128, device=DEV)[:, ::2]  # non-unit stride input
    _check(tk.act_sparse_gemv(xs, w_t, 0.3), tk.act_sparse_gemv_reference(xs, w_t, 0.3), torch.float32)


@needs_kernels
def test_argument_errors():
    x = torch.randn(2, 16, device=DEV)
    with pytest.raises(ValueError, match="expected \\[K, N\\]"):
        tk.act_sparse_gemv(x, torch.randn(8, 16, device=DEV))
    with pytest.raises(TypeError, match="same dtype"):
        tk.act_sparse_gemv(x, torch.randn(16, 8, device=DEV).half())
    with pytest.raises(TypeError, match="dtype"):
        tk.act_sparse_gemv(x.double(), torch.randn(16, 8, device=DEV).double())
    with pytest.raises(ValueError, match="threshold"):
        tk.act_sparse_gemv(x, torch.randn(16, 8, device=DEV), -1.0)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
def test_sweep_slow(B, sparsity, dtype):
    x, w_t, t = _case(B, 515, 771, dtype, sparsity, seed=B)
    _check(tk.act_sparse_gemv(x, w_t, t), tk.act_sparse_gemv_reference(x, w_t, t), dtype)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_gpu_llm_shapes(B, sparsity, dtype):
    for K, N in [(4096, 4096), (4096, 14336), (14336, 4096), (4095, 1001)]:
        x, w_t, t = _case(B, K, N, dtype, sparsity, device="cuda")
        _check(tk.act_sparse_gemv(x, w_t, t), tk.act_sparse_gemv_reference(x, w_t, t), dtype)

