"""Mask functions: exact counts, N:M structure, deterministic ties, Wanda vs brute force, bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmprune.sparsity import (
    magnitude_mask,
    mask_sparsity,
    nm_mask,
    num_pruned,
    parse_pattern,
    unstructured_mask,
    wanda_mask,
    wanda_scores,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.95])
@pytest.mark.parametrize("shape", [(7, 13), (16, 64), (3, 100)])
def test_unstructured_row_exact(sparsity, shape):
    scores = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    keep = unstructured_mask(scores, sparsity, per="row")
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert (keep.shape[1] - keep.sum(1) == num_pruned(shape[1], sparsity)).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_unstructured_layer_exact_and_lowest(sparsity):
    scores = torch.randn(9, 31, generator=torch.Generator().manual_seed(2))
    keep = unstructured_mask(scores, sparsity, per="layer")
    k = num_pruned(scores.numel(), sparsity)
    assert int((~keep).sum()) == k
    if 0 < k < scores.numel():
        assert scores[~keep].max() <= scores[keep].min()


def test_unstructured_pruned_are_lowest_per_row():
    scores = torch.randn(10, 40, generator=torch.Generator().manual_seed(3))
    keep = unstructured_mask(scores, 0.5)
    for r in range(10):
        assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


def test_ties_are_deterministic_lower_index_pruned_first():
    scores = torch.ones(2, 8)
    keep = unstructured_mask(scores, 0.5)
    assert keep.tolist() == [[False] * 4 + [True] * 4] * 2
    assert torch.equal(keep, unstructured_mask(scores.clone(), 0.5))
    keep24 = nm_mask(torch.ones(1, 8), 2, 4)
    assert keep24.tolist() == [[False, False, True, True] * 2]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_exactly_n_of_m(n, m):
    scores = torch.randn(12, 64, generator=torch.Generator().manual_seed(4))
    keep = nm_mask(scores, n, m)
    groups = keep.reshape(12, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    assert mask_sparsity(keep) == pytest.approx(1 - n / m)
    # the kept ones are the largest of their group
    s = scores.reshape(12, -1, m)
    assert (s.masked_fill(~groups, float("inf")).min(-1).values >= s.masked_fill(groups, -float("inf")).max(-1).values).all()


def test_nm_indivisible_in_features_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(3, 10), 2, 4)
    with pytest.raises(ValueError, match="divisible by 8"):
        nm_mask(torch.rand(3, 12), 4, 8)


def _wanda_brute_force(w, x, sparsity):
    """Reference: for every row, try every subset of the right size and keep the one with the largest
    total |W_ij| * ||X_j|| (equivalently prune the smallest scores)."""
    norm = torch.sqrt((x.double() ** 2).sum(0))
    rows, cols = w.shape
    k = num_pruned(cols, sparsity)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        best, best_set = None, None
        for kept in itertools.combinations(range(cols), cols - k):
            value = sum(float(abs(w[r, j]) * norm[j]) for j in kept)
            if best is None or value > best + 1e-12:
                best, best_set = value, kept
        keep[r, list(best_set)] = True
    return keep


def test_wanda_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 8, generator=g)
    x = torch.randn(50, 8, generator=g) * torch.rand(8, generator=g) * 4
    for sparsity in (0.25, 0.5, 0.75):
        keep = wanda_mask(w, x.norm(dim=0), sparsity)
        assert torch.equal(keep, _wanda_brute_force(w, x, sparsity))
    assert torch.allclose(wanda_scores(w, x.norm(dim=0)), w.abs() * x.norm(dim=0))


def test_wanda_differs_from_magnitude_when_activations_are_skewed():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(8, 16, generator=g)
    norm = torch.ones(16)
    norm[:4] = 100.0
    assert not torch.equal(wanda_mask(w, norm, 0.5), magnitude_mask(w, 0.5))
    assert wanda_mask(w, norm, 0.5)[:, :4].all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_mask(torch.rand(2, 4), bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        unstructured_mask(torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="per="):
        unstructured_mask(torch.rand(2, 4), 0.5, per="column")
    with pytest.raises(ValueError, match="NaN"):
        unstructured_mask(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="N:M"):
        nm_mask(torch.rand(2, 4), 0, 4)
    with pytest.raises(ValueError, match="input_norm"):
        wanda_scores(torch.rand(2, 4), torch.rand(5))
    for bad in ("2-4", "5:4", "x:y", "dense", "0:4"):
        with pytest.raises(ValueError):
            parse_pattern(bad)
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("unstructured") is None
