"""Weight-sparsity methods beyond SparseGPT: ALPS (ADMM + exact update on the support), RIA scores, OWL
per-layer ratios; each against an independent reference or a property the paper states."""

from __future__ import annotations

import pytest
import torch

from llmprune.sparsity import (HessianAccumulator, SparsityConfig, alps_prune, masked_least_squares, owl_ratios,
                               ria_mask, ria_scores, sparsegpt_prune, sparsify)

from tiny_models import tiny_causal_lm


def _layer(seed=0, rows=32, cols=64, tokens=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)
    acc = HessianAccumulator(cols)
    acc.update(x)
    return w, x, acc.hessian()


def _err(w, wp, x):
    return float((x @ w.T - x @ wp.T).norm() / (x @ w.T).norm())


def test_ria_scores_match_a_loop_reference():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    norm = torch.rand(7) + 0.1
    a = w.abs()
    ref = torch.empty_like(w)
    for i in range(5):
        for j in range(7):
            ref[i, j] = (a[i, j] / a[:, j].sum() + a[i, j] / a[i, :].sum()) * norm[j] ** 0.5
    torch.testing.assert_close(ria_scores(w, norm), ref)
    keep = ria_mask(w.repeat(1, 4)[:, :28], torch.rand(28) + 0.1, 0.5, nm=(2, 4))
    assert (keep.reshape(5, -1, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="expected"):
        ria_scores(w, torch.ones(6))


def test_masked_least_squares_is_the_closed_form_on_the_support():
    w, _, H = _layer(seed=3, rows=6, cols=24)
    H = H + 0.01 * torch.eye(24, dtype=H.dtype) * H.diagonal().mean()
    keep = torch.rand(6, 24, generator=torch.Generator().manual_seed(1)) > 0.5
    got = masked_least_squares(w.double(), H, keep, iters=200, tol=1e-12)
    for r in range(6):
        s = keep[r].nonzero().squeeze(1)
        exact = torch.linalg.solve(H[s][:, s], (w[r].double() @ H)[s])
        torch.testing.assert_close(got[r, s], exact, atol=1e-8, rtol=1e-6)
        assert bool((got[r, ~keep[r]] == 0).all())


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_alps_exact_sparsity_and_lower_error_than_sparsegpt(sparsity, nm):
    w, x, H = _layer(seed=1)
    new_w, keep = alps_prune(w, H, sparsity, nm=nm)
    assert new_w.dtype == w.dtype and torch.equal(new_w == 0, ~keep)
    if nm is None:
        assert int((~keep).sum()) == round(sparsity * w.numel())
    else:
        assert (keep.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    sgpt, _ = sparsegpt_prune(w, H, sparsity, nm=nm, blocksize=32)
    assert _err(w, new_w, x) < _err(w, sgpt, x)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_owl_ratios_exact_mean_bounded_and_ordered(target):
    outliers = [0.01, 0.05, 0.02, 0.08, 0.03]
    sizes = [100, 100, 200, 100, 50]
    ratios = owl_ratios(outliers, target, sizes, spread=0.08)
    mean = sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes)
    assert abs(mean - target) < 1e-9
    assert max(ratios) - min(ratios) <= 2 * 0.08 + 1e-9  # OWL's lambda: the ratios span at most 2 * spread
    order = sorted(range(5), key=lambda i: outliers[i])
    assert [ratios[i] for i in order] == sorted(ratios, reverse=True)  # more outliers, less sparsity
    assert owl_ratios([0.1] * 3, target, [1, 2, 3]) == pytest.approx([target] * 3)


def test_sparsify_alps_ria_owl_on_a_model():
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    for cfg in (SparsityConfig(method="alps", sparsity=0.5, n_samples=4, seq_len=24),
                SparsityConfig(method="ria", sparsity=0.5, pattern="2:4", n_samples=4, seq_len=24),
                SparsityConfig(method="wanda", sparsity=0.6, allocation="owl", n_samples=4, seq_len=24)):
        model = tiny_causal_lm("llama")
        report = sparsify(model, cfg, calibration=ids, progress=False)
        assert report.overall_sparsity == pytest.approx(cfg.sparsity, abs=2e-3), cfg.method
        per_layer = {}
        for name, s in report.layers.items():
            per_layer.setdefault(name.split(".")[2], []).append(s)
        if cfg.allocation == "owl":
            assert len({round(v[0], 3) for v in per_layer.values()}) > 1  # non-uniform across blocks
        assert SparsityConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="owl"):
        SparsityConfig(method="wanda", allocation="owl", pattern="2:4")
