"""gather_swiglu (gathered-neuron SwiGLU MLP) vs its PyTorch reference.

Kernel runs in the CPU interpreter (TRITON_INTERPRET=1) or on CUDA. Tolerances (fp32 math on
both sides, output cast to the input dtype): fp32 atol=rtol=1e-4, fp16 atol=rtol=1e-2,
bf16 (GPU only) atol=rtol=3e-2.
"""
import pytest
import torch

from kernel_common import DEV, TOL, gpu_only, needs_kernels, tk


def _case(B, H, I, keep, dtype, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, generator=g).to(dtype).to(device)
    wg = (torch.randn(I, H, generator=g) / H**0.5).to(dtype).to(device)
    wu = (torch.randn(I, H, generator=g) / H**0.5).to(dtype).to(device)
    wd_t = (torch.randn(I, H, generator=g) / I**0.5).to(dtype).to(device)
    idx = torch.randperm(I, generator=g)[: round(keep * I)].to(torch.int32).to(device)
    return x, wg, wu, wd_t, idx


def _check(y, r, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(y.float().cpu(), r.float().cpu(), atol=tol, rtol=tol)


def test_reference_full_index_equals_dense_mlp():
    x, wg, wu, wd_t, _ = _case(3, 32, 48, 1.0, torch.float32, device="cpu")
    dense = (torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) @ wd_t
    idx = torch.arange(48)
    torch.testing.assert_close(tk.gather_swiglu_reference(x, wg, wu, wd_t, idx), dense)
    # keeping a subset equals zeroing the other neurons
    sub = torch.tensor([5, 1, 40])
    mask = torch.zeros(48)
    mask[sub] = 1
    ref = ((torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) * mask) @ wd_t
    torch.testing.assert_close(tk.gather_swiglu_reference(x, wg, wu, wd_t, sub), ref)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("B,H,I", [(1, 96, 200), (5, 130, 333)])
def test_matches_reference(B, H, I, keep, dtype):
    x, wg, wu, wd_t, idx = _case(B, H, I, keep, dtype)
    y = tk.gather_swiglu(x, wg, wu, wd_t, idx)
    assert y.shape == (B, H) and y.dtype == dtype
    _check(y, tk.gather_swiglu_reference(x, wg, wu, wd_t, idx), dtype)
    if keep == 0.0:
        assert torch.count_nonzero(y) == 0


@needs_kernels
def test_unselected_neurons_never_read_int64_split_chunks():
    x, wg, wu, wd_t, idx = _case(9, 64, 97, 0.3, torch.float32, seed=1)
    r = tk.gather_swiglu_reference(x, wg, wu, wd_t, idx)
    dead = torch.ones(97, dtype=torch.bool)
    dead[idx.long()] = False
    for w in (wg, wu, wd_t):
        w[dead] = float("nan")
    for sk in (1, 3):
        y = tk.gather_swiglu(x, wg, wu, wd_t, idx.long(), split_k=sk)
        assert torch.isfinite(y).all()
        _check(y, r, torch.float32)
    _check(tk.gather_swiglu(x[2], wg, wu, wd_t, idx), r[2], torch.float32)


@needs_kernels
def test_argument_errors():
    x, wg, wu, wd_t, idx = _case(2, 32, 40, 0.5, torch.float32)
    with pytest.raises(ValueError, match="down.weight.T"):
        tk.gather_swiglu(x, wg, wu, wd_t.t().contiguous(), idx)
    with pytest.raises(TypeError, match="idx"):
        tk.gather_swiglu(x, wg, wu, wd_t, idx.float())


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_sweep_slow(B, keep, dtype):
    x, wg, wu, wd_t, idx = _case(B, 257, 700, keep, dtype, seed=B)
    _check(tk.gather_swiglu(x, wg, wu, wd_t, idx), tk.gather_swiglu_reference(x, wg, wu, wd_t, idx), dtype)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_gpu_llm_shapes(B, keep, dtype):
    x, wg, wu, wd_t, idx = _case(B, 4096, 14336, keep, dtype, device="cuda")
    _check(tk.gather_swiglu(x, wg, wu, wd_t, idx), tk.gather_swiglu_reference(x, wg, wu, wd_t, idx), dtype)
