"""SparseGPT's column pass in float32 (the default; the factorisation stays in the Hessian's float64) against
the float64 pass and the former float64 implementation (tests/sparsegpt_reference.py): same sparsity, masks
agreeing on >= 99.9% of entries, reconstruction errors within 1%, on random and on ill-conditioned Hessians."""

from __future__ import annotations

import pytest
import torch

from llmprune.sparsity import HessianAccumulator, sparsegpt_prune_group
from llmprune.sparsity.cholesky import _damped_reverse_cholesky

SETTINGS = [(0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))]


def _hessian(x):
    acc = HessianAccumulator(x.shape[1])
    for part in x.split(500):
        acc.update(part)
    return acc.hessian()


def _inputs(kind, cols, seed):
    """Calibration inputs: ``random`` (correlated, well conditioned) or like an LLM's: heavy-tailed feature
    scales over six decades with a few outlier features, near-duplicate and dead features, and fewer tokens
    than features (a singular Hessian, conditioned by the dampening alone)."""
    g = torch.Generator().manual_seed(seed)
    tokens = 4 * cols if kind == "random" else cols // 2
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    if kind == "random":
        return x * (torch.rand(cols, generator=g) * 3 + 0.1)
    x = x * torch.logspace(-3, 3, cols)[torch.randperm(cols, generator=g)]
    x[:, :4] *= 50.0  # outlier features
    x[:, 10] = x[:, 11] * (1 + 1e-6)  # near-duplicate inputs
    x[:, 20] = 0.0  # a dead input
    return x


def _error(w, new_w, H):
    D = w.double() - new_w.double()
    return float(torch.einsum("ij,jk,ik->", D, H, D))


def _reference():
    import sparsegpt_reference

    return sparsegpt_reference


@pytest.mark.parametrize("kind", ["random", "ill_conditioned"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_float32_pass_matches_float64_and_reference(kind, setting):
    sparsity, nm = setting
    cols = 256
    H = _hessian(_inputs(kind, cols, seed=3))
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(rows, cols, generator=g) * 0.05 for rows in (96, 32, 32)]
    fast = sparsegpt_prune_group(weights, H, sparsity, nm=nm)
    exact = sparsegpt_prune_group(weights, H, sparsity, nm=nm, dtype=torch.float64)
    for w, (w32, k32), (w64, k64) in zip(weights, fast, exact):
        ref_w, ref_k = _reference().sparsegpt_prune(w, H, sparsity, nm=nm)
        assert w32.dtype == w.dtype and (w32[~k32] == 0).all()
        assert int((~k32).sum()) == int((~k64).sum()) == int((~ref_k).sum())
        assert float((k64 == ref_k).float().mean()) == 1.0  # the float64 pass is the former solve
        for other_w, other_k in ((w64, k64), (ref_w, ref_k)):
            agreement = float((k32 == other_k).float().mean())
            assert agreement >= 0.999, agreement
            e32, e_other = _error(w, w32, H), _error(w, other_w, H)
            assert abs(e32 - e_other) <= 0.01 * e_other + 1e-12, (e32, e_other)


def test_factor_is_cast_from_the_hessians_precision():
    """The factorisation runs in H's precision whatever ``dtype``: float32 factors of ill-conditioned
    Hessians change too many N:M choices."""
    H = _hessian(_inputs("ill_conditioned", 128, seed=5))
    V64 = _damped_reverse_cholesky(H)
    V32 = _damped_reverse_cholesky(H, dtype=torch.float32)
    assert V64.dtype == torch.float64 and V32.dtype == torch.float32
    assert torch.equal(V32, V64.to(torch.float32))
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(128, dtype=H.dtype)
    torch.testing.assert_close(V64 @ V64.T, damped, rtol=1e-8, atol=1e-10 * float(H.abs().max()))
    assert torch.equal(V64, V64.triu())


def test_dtype_none_solves_in_the_hessians_precision():
    H = _hessian(_inputs("random", 64, seed=6))
    w = torch.randn(16, 64)
    (a, ka), = sparsegpt_prune_group([w], H, 0.5, dtype=None)
    (b, kb), = sparsegpt_prune_group([w], H, 0.5, dtype=torch.float64)
    assert torch.equal(a, b) and torch.equal(ka, kb)
