"""SparseGPT on single linear layers: Hessian, exact masks, and lower reconstruction error."""

from __future__ import annotations

import pytest
import torch

from llmprune.sparsity import HessianAccumulator, magnitude_mask, sparsegpt_prune, wanda_mask


def _layer(seed=0, rows=64, cols=128, tokens=1024):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated, unevenly scaled inputs (as LLM activations are)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)
    return w, x


def _hessian(x, chunk=300):
    acc = HessianAccumulator(x.shape[1])
    for part in x.split(chunk):
        acc.update(part)
    return acc.hessian()


def test_hessian_accumulator_equals_2xtx_over_n():
    _, x = _layer()
    H = _hessian(x)
    assert torch.allclose(H, 2 * x.double().T @ x.double() / x.shape[0], rtol=1e-10, atol=1e-10)


def _err(w, wp, x):
    return float((x @ w.T - x @ wp.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
def test_sparsegpt_beats_magnitude_and_wanda(pattern):
    w, x = _layer(seed=1)
    H = _hessian(x)
    new_w, keep = sparsegpt_prune(w, H, 0.5, nm=pattern, blocksize=32)
    assert new_w.dtype == w.dtype and new_w.shape == w.shape
    assert torch.equal(new_w == 0, ~keep)
    assert int((~keep).sum()) == w.numel() // 2
    if pattern is not None:
        n, m = pattern
        assert (keep.reshape(w.shape[0], -1, m).sum(-1) == n).all()
    e_sgpt = _err(w, new_w, x)
    e_mag = _err(w, w * magnitude_mask(w, 0.5, nm=pattern), x)
    e_wanda = _err(w, w * wanda_mask(w, x.norm(dim=0), 0.5, nm=pattern), x)
    assert e_sgpt < e_wanda < e_mag


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.6])
def test_sparsegpt_unstructured_count_is_exact_across_blocks(sparsity):
    w, x = _layer(seed=2, rows=10, cols=100, tokens=400)
    _, keep = sparsegpt_prune(w, _hessian(x), sparsity, blocksize=32)
    assert int((~keep).sum()) == round(sparsity * w.numel())


def test_sparsegpt_handles_dead_inputs_and_rank_deficient_hessian():
    w, x = _layer(seed=3, rows=8, cols=32, tokens=16)  # fewer tokens than features: singular H
    x[:, 5] = 0.0  # a feature that is never active
    new_w, keep = sparsegpt_prune(w, _hessian(x), 0.5)
    assert torch.isfinite(new_w).all()
    assert (new_w[:, 5] == 0).all()


def test_sparsegpt_zero_sparsity_is_identity_and_bad_shapes():
    w, x = _layer(seed=4, rows=8, cols=32, tokens=64)
    new_w, keep = sparsegpt_prune(w, _hessian(x), 0.0)
    assert keep.all() and torch.allclose(new_w, w)
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt_prune(w, torch.eye(16), 0.5)
    with pytest.raises(ValueError, match="divisible"):
        sparsegpt_prune(w[:, :30], torch.eye(30), 0.5, nm=(2, 4))
    with pytest.raises(ValueError, match="no inputs"):
        HessianAccumulator(4).hessian()
