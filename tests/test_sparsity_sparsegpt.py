"""SparseGPT on single linear layers: Hessian, exact masks, and lower reconstruction error."""

from __future__ import annotations

import pytest
import torch

from llmprune.sparsity import HessianAccumulator, inverse_hessian_cholesky, magnitude_mask, sparsegpt_prune, wanda_mask
from llmprune.sparsity import sparsegpt


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


# --- the blocked solver against the former column-by-column one (tests/sparsegpt_reference.py) ---

def _reference():
    import sparsegpt_reference

    return sparsegpt_reference


def _recon_error(w, new_w, H):
    """||W X - W' X||^2 up to the factor 2/N: tr(D H D^T) with D = W - W'."""
    D = (w.double() - new_w.double())
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def _constructed(kind, rows, cols, seed):
    """Layers with the structure that trips up mask selection: ties, dead and duplicated inputs, low rank."""
    w, x = _layer(seed=seed, rows=rows, cols=cols, tokens=4 * cols)
    if kind == "ties":  # quantised weights: many equal saliencies within a column
        w = (w * 2).round() / 2
    elif kind == "dead_and_duplicate":
        x[:, 3] = 0.0  # never active
        x[:, 7] = x[:, 8]  # two identical inputs: singular Hessian
        w[:, 10:14] = 0.0  # already-pruned weights tie at saliency 0
    elif kind == "low_rank":
        x = x[: cols // 4]
    return w, _hessian(x)


def _check_against_reference(w, H, sparsity, nm, blocksize):
    ref_w, ref_keep = _reference().sparsegpt_prune(w, H, sparsity, nm=nm, blocksize=blocksize)
    new_w, keep = sparsegpt_prune(w, H, sparsity, nm=nm, blocksize=blocksize)
    assert new_w.dtype == w.dtype and new_w.shape == w.shape and new_w.is_contiguous() and keep.is_contiguous()
    assert int((~keep).sum()) == int((~ref_keep).sum())  # same sparsity exactly
    assert (new_w[~keep] == 0).all()
    if nm is not None:
        assert (keep.reshape(w.shape[0], -1, nm[1]).sum(-1) == nm[0]).all()
    agreement = float((keep == ref_keep).float().mean())
    assert agreement >= 0.999, agreement
    e_new, e_ref = _recon_error(w, new_w, H), _recon_error(w, ref_w, H)
    assert e_new <= 1.01 * e_ref + 1e-12, (e_new, e_ref)


@pytest.fixture(params=["wide", "narrow"])
def sub_blocks(request, monkeypatch):
    """Sub-block width: as chosen for these small layers (one per block), or 8 columns (several per block)."""
    if request.param == "narrow":
        monkeypatch.setattr(sparsegpt, "_SERIAL_ELEMENTS", 8)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 64), (40, 200), (16, 328)])  # 200, 328: ragged last block
@pytest.mark.parametrize("setting", [(0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_sparsegpt_matches_reference_on_random_layers(setting, shape, dtype, sub_blocks):
    sparsity, nm = setting
    rows, cols = shape
    w, x = _layer(seed=rows + cols, rows=rows, cols=cols, tokens=3 * cols)
    _check_against_reference(w.to(dtype), _hessian(x), sparsity, nm, blocksize=64 if cols == 200 else 128)


@pytest.mark.parametrize("kind", ["ties", "dead_and_duplicate", "low_rank"])
@pytest.mark.parametrize("setting", [(0.5, None), (0.3, None), (0.5, (2, 4)), (0.25, (1, 4))])
def test_sparsegpt_matches_reference_on_constructed_layers(kind, setting, sub_blocks):
    sparsity, nm = setting
    w, H = _constructed(kind, rows=32, cols=96, seed=5)
    _check_against_reference(w, H, sparsity, nm, blocksize=32)


def test_inverse_hessian_cholesky_matches_reference():
    _, x = _layer(seed=6, rows=4, cols=80, tokens=60)  # rank-deficient: dampening matters
    H = _hessian(x)
    U = inverse_hessian_cholesky(H)
    torch.testing.assert_close(U, _reference().inverse_hessian_cholesky(H), rtol=1e-9, atol=1e-10)
    assert torch.equal(U, U.triu())
    damp = 0.01 * float(torch.diagonal(H).mean())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H + damp * torch.eye(80, dtype=H.dtype)),
                               rtol=1e-8, atol=1e-10)
