"""SparseGPT's memory-lean solve: the blocked in-place reverse Cholesky against LAPACK on flipped matrices,
the view transform from ``Vs`` alone, and a solve that consumes its Hessian against one that does not."""

from __future__ import annotations

import pytest
import torch

from llmprune.sparsity import HessianAccumulator, sparsegpt_prune, sparsegpt_prune_group
from llmprune.sparsity.cholesky import _damped_reverse_cholesky, _reverse_cholesky_
from llmprune.sparsity.sparsegpt import _view_transform


def _gram(n, tokens=None, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens or 2 * n, n, generator=g, dtype=torch.float64)
    x = x * torch.logspace(-1.5, 1.5, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x[:, list(dead)] = 0.0
    return x.T @ x / x.shape[0]


def _reference(H, damp):
    """Upper triangular V with V V^T = H + damp I, by LAPACK on the flipped matrix (H's upper triangle)."""
    sym = H.triu() + H.triu(1).T
    sym = sym + damp * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(sym.flip(0, 1)).flip(0, 1)


@pytest.mark.parametrize("n,block", [(1, 4), (5, 4), (64, 16), (100, 32), (130, 64), (257, 64), (600, None)])
def test_reverse_cholesky_in_place_matches_lapack(n, block):
    H = _gram(n, seed=n)
    H[0, -1] += 1e-9  # not exactly symmetric: the upper triangle is the one read
    original = H.clone()
    _reverse_cholesky_(H, 0.01, block=block)
    ref = _reference(original, 0.01 * float(original.diagonal().mean()))
    torch.testing.assert_close(H.triu(), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    # strictly lower triangle: the original upper triangle, mirrored, exactly
    assert torch.equal(H.tril(-1), original.triu(1).T.tril(-1))


def test_dead_columns_in_place():
    """Dead inputs (zero rows and columns): dampening alone makes their pivots positive."""
    H = _gram(70, tokens=200, seed=2, dead=(0, 33, 69))
    original = H.clone()
    _reverse_cholesky_(H, 0.01, block=16)
    ref = _reference(original, 0.01 * float(original.diagonal().mean()))
    torch.testing.assert_close(H.triu(), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    assert (H.triu(1)[[0, 33]] == 0).all()  # a dead row of V stays zero off the diagonal


def test_not_positive_definite_raises_damping_and_restores():
    n = 90
    H = _gram(n, tokens=40, seed=3)  # rank 40
    H -= 0.05 * float(H.diagonal().mean()) * torch.eye(n, dtype=H.dtype)  # indefinite: 1% dampening is not enough
    original = H.clone()
    _reverse_cholesky_(H, 0.01, block=32)
    # the first try (1%) fails, the second (10%) succeeds: from the restored H, not the failed try's leftovers
    ref = _reference(original, 0.1 * float(original.diagonal().mean()))
    torch.testing.assert_close(H.triu(), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    assert torch.equal(H.tril(-1), original.triu(1).T.tril(-1))

    H = original.clone()
    with pytest.raises(RuntimeError, match="not positive definite"):
        _reverse_cholesky_(H, 0.01, max_tries=1, block=32)
    assert torch.equal(H, original.triu() + original.triu(1).T)  # restored (made symmetric from its upper triangle)


def test_non_finite_hessian_raises():
    H = _gram(40, seed=4)
    H[3, 20] = float("nan")
    with pytest.raises(RuntimeError, match="not positive definite"):
        _reverse_cholesky_(H, 0.01, block=16)


@pytest.mark.parametrize("m", [4, 8, 37])
def test_view_transform_is_inverse_of_unit_vs(m):
    """T = diag(D) D^-1 for a diagonal block D of V equals (I + Vs_block)^-1 (Vs = V / diag, zero diagonal)."""
    V = _damped_reverse_cholesky(_gram(m, seed=m))
    d = V.diagonal()
    Vs = V / d
    Vs.fill_diagonal_(0.0)
    T_from_V = torch.diag(d) @ torch.linalg.inv(V)
    T = _view_transform(Vs)
    torch.testing.assert_close(T, T_from_V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(T, torch.linalg.inv(torch.eye(m, dtype=V.dtype) + Vs), rtol=1e-10, atol=1e-12)
    batch = torch.stack([Vs, 2 * Vs])  # batched (N:M groups)
    torch.testing.assert_close(_view_transform(batch)[1], torch.linalg.inv(torch.eye(m, dtype=V.dtype) + 2 * Vs))


@pytest.fixture(params=["in-place", "flipped-copy"])
def factorisation(request, monkeypatch):
    """Which factorisation the solve uses: the in-place one (made to apply to these narrow Hessians) or the
    flipped copy (what Hessians of up to ``_ONE_SHOT`` columns get)."""
    from llmprune.sparsity import sparsegpt as sg

    if request.param == "in-place":
        monkeypatch.setattr(sg, "_ONE_SHOT", 0)
    return request.param


@pytest.fixture
def in_place(monkeypatch):
    from llmprune.sparsity import sparsegpt as sg

    monkeypatch.setattr(sg, "_ONE_SHOT", 0)


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, None])
def test_consuming_the_hessian_gives_identical_results(nm, dtype, factorisation):
    cols = 160
    H = _gram(cols, tokens=100, seed=5, dead=(7,))
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(rows, cols, generator=g) for rows in (24, 8)]
    H_before = H.clone()
    kept = sparsegpt_prune_group(weights, H, 0.5, nm=nm, dtype=dtype, blocksize=32)
    assert torch.equal(H, H_before)  # the caller's H is untouched by default
    consumed_H = H.clone()
    consumed = sparsegpt_prune_group(weights, consumed_H, 0.5, nm=nm, dtype=dtype, blocksize=32,
                                     overwrite_hessian=True)
    for (a, ka), (b, kb) in zip(kept, consumed):
        assert torch.equal(a, b) and torch.equal(ka, kb)
    if factorisation == "flipped-copy":  # a narrow H is not used as memory: only its dead diagonal set
        assert torch.equal(consumed_H.tril(-1), H_before.tril(-1))
    elif dtype is None:  # the float64 pass uses H's own memory for the factor
        assert consumed_H.shape == (cols, cols) and torch.equal(consumed_H, consumed_H.triu(1))  # Vs
    else:  # emptied once the float32 factor exists
        assert consumed_H.numel() == 0


def test_single_weight_consumes_too(in_place):
    H = _gram(48, seed=7)
    w = torch.randn(12, 48)
    a, ka = sparsegpt_prune(w, H.clone(), 0.5)
    H2 = H.clone()
    b, kb = sparsegpt_prune(w, H2, 0.5, overwrite_hessian=True)
    assert torch.equal(a, b) and torch.equal(ka, kb) and H2.numel() == 0


def test_accumulator_release_hands_over():
    acc = HessianAccumulator(8)
    acc.update(torch.randn(20, 8))
    H = acc.hessian()
    assert acc.release() is H and acc.H is None
    with pytest.raises(ValueError, match="released"):
        acc.hessian()


@pytest.mark.parametrize("rows", [40, 100, 300])  # W0 and C in H's spare memory, W0 only, neither
def test_factor_and_work_matrices_in_the_hessians_memory(monkeypatch, in_place, rows):
    """The float32 factor written over the float64 H it is read from (and W0 / C in the rest) gives what a
    separately allocated factor gives."""
    from llmprune.sparsity import cholesky, sparsegpt as sg

    cols = 160
    H = _gram(cols, tokens=120, seed=8)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(9))
    V, spare = cholesky._upper_in_place(H.clone(), torch.float32)
    assert torch.equal(V, H.triu().to(torch.float32)) and spare.numel() == cols * cols
    in_place = sparsegpt_prune(w, H.clone(), 0.5, blocksize=32, overwrite_hessian=True)
    # the solve's own reference to the in-place factor, replaced by a separately allocated one
    monkeypatch.setattr(sg, "_upper_in_place", lambda H, dtype: (cholesky._upper(H, dtype, consume=True), None))
    separate = sparsegpt_prune(w, H.clone(), 0.5, blocksize=32, overwrite_hessian=True)
    assert torch.equal(in_place[0], separate[0]) and torch.equal(in_place[1], separate[1])


def test_overwrite_weights_writes_the_pruned_weights_in_place(factorisation):
    cols = 64
    H = _gram(cols, seed=10)
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(rows, cols, generator=g).to(torch.bfloat16) for rows in (16, 8)]
    before = [w.clone() for w in weights]
    fresh = sparsegpt_prune_group(weights, H, 0.5, blocksize=16)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))  # untouched by default
    written = sparsegpt_prune_group(weights, H, 0.5, blocksize=16, overwrite_weights=True)
    for w, (a, ka), (b, kb) in zip(weights, fresh, written):
        assert b is w and torch.equal(a, b) and torch.equal(ka, kb)
    wt = before[0].T.contiguous().T  # a transposed view (GPT-2 Conv1D layout) is written through too
    (c, kc), = sparsegpt_prune_group([wt], H, 0.5, blocksize=16, overwrite_weights=True)
    assert torch.equal(wt, fresh[0][0]) and torch.equal(kc, fresh[0][1])


def test_float32_hessian_is_solved_in_its_own_memory(in_place):
    """As on GPU (float32 accumulation): factor, Vs and the pass all in H's memory when consumed."""
    cols = 96
    H = _gram(cols, seed=12).float()
    w = torch.randn(20, cols, generator=torch.Generator().manual_seed(13))
    a, ka = sparsegpt_prune(w, H, 0.5, blocksize=32)
    H2 = H.clone()
    b, kb = sparsegpt_prune(w, H2, 0.5, blocksize=32, overwrite_hessian=True)
    assert torch.equal(a, b) and torch.equal(ka, kb)
    assert H2.shape == (cols, cols) and torch.equal(H2, H2.triu(1))  # now Vs


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_both_factorisations_give_the_same_solve(monkeypatch, nm):
    """Narrow Hessians (flipped copy) and wide ones (in place) differ only by rounding."""
    from llmprune.sparsity import sparsegpt as sg

    cols = 192
    H = _gram(cols, tokens=400, seed=14, dead=(3,))
    w = torch.randn(48, cols, generator=torch.Generator().manual_seed(15))
    a, ka = sparsegpt_prune(w, H, 0.5, nm=nm, blocksize=32)
    monkeypatch.setattr(sg, "_ONE_SHOT", 0)
    b, kb = sparsegpt_prune(w, H, 0.5, nm=nm, blocksize=32)
    assert float((ka == kb).float().mean()) >= 0.999
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
