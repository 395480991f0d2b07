"""Same inputs and seed -> identical kept indices; selection helpers behave as documented."""

from __future__ import annotations

import bisect

import pytest
import torch

from llmprune import PruneConfig
from llmprune import prune
from llmprune.calibration.calibrate import calibration_batches
from llmprune.core.allocate import allocate_global
from llmprune.structured.select import attention_units, keep_after_removing

from tiny_models import tiny_causal_lm


def test_same_seed_same_plan(ref_model_path, shared_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref_model_path)
    calib = shared_dir / "data" / "reference-train.txt"
    plans = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(ref_model_path)
        cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda", n_samples=4, seq_len=64, seed=7, allocation="global")
        plans.append(prune(model, cfg, tokenizer=tok, calibration=calib, progress=False).plan)
    assert plans[0] == plans[1]
    text = calib.read_text()[:20000]
    a = calibration_batches(tok, text, 4, 32, seed=1)
    b = calibration_batches(tok, text, 4, 32, seed=1)
    c = calibration_batches(tok, text, 4, 32, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("span,n", [(40000, 8), (1000, 128), (5, 12), (10**6, 100), (7, 1)])
def test_calibration_offsets_are_stratified(span, n):
    """One offset inside each of n equal slices of [0, span), every power-of-two prefix spread over all of
    them, and a different set per seed."""
    from llmprune.calibration.calibrate import _stratified_offsets

    draws = [_stratified_offsets(span, n, torch.Generator().manual_seed(seed)) for seed in range(3)]
    for offsets in draws:
        assert len(offsets) == n and all(0 <= o < span for o in offsets)
        if span < n:
            continue
        edges = [k * span // n for k in range(n + 1)]
        assert sorted(bisect.bisect_right(edges, o) - 1 for o in offsets) == list(range(n))  # one per slice
        width = 2
        while width <= n:  # the first 2^j offsets leave no gap wider than ~2 / 2^j of the span
            head = sorted(offsets[:width])  # gaps measured cyclically: the order is rotated
            gaps = [b - a for a, b in zip(head, head[1:])] + [head[0] + span - head[-1]]
            assert max(gaps) < 2.5 * span / width, (width, gaps)
            width *= 2
    if span > 3 * n:
        assert draws[0] != draws[1] != draws[2]


def test_calibration_windows_sample_a_concatenated_corpus_in_proportion(ref_model_path):
    """Two corpora of equal length in one file: half the windows come from each, whatever the seed
    (independent draws are Binomial(64, 1/2): 32 +- 4)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref_model_path)
    first, second = "the cat sat on the mat and purred. " * 600, "a dog ran in a fog and barked. " * 677
    ids = lambda t: set(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    only_first, only_second = ids(first[:700]) - ids(second[:700]), ids(second[:700]) - ids(first[:700])
    for seed in range(5):
        windows = torch.cat(calibration_batches(tok, first + second, 64, 16, seed=seed)).tolist()
        n_first = sum(sum(t in only_first for t in w) > sum(t in only_second for t in w) for w in windows)
        assert 31 <= n_first <= 33, (seed, n_first)


def test_ties_break_by_index():
    assert keep_after_removing(torch.ones(5), 2) == [2, 3, 4]


def test_attention_units_modes():
    q = torch.tensor([1.0, 5.0, 3.0, 2.0])  # 2 groups of 2
    kv = torch.tensor([1.0, 1.0])
    units, scores = attention_units(q, kv, group_size=2, mode="group")
    assert [u.q_heads for u in units] == [(0, 1), (2, 3)] and scores.tolist() == [7.0, 6.0]
    units, scores = attention_units(q, kv, group_size=2, mode="query")
    assert [u.q_heads for u in units] == [(0, 3), (1, 2)] and [u.kv_heads for u in units] == [(), ()]


def test_global_allocation_respects_min_keep():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.1, 10.0, 10.0, 10.0])]
    counts = allocate_global(scores, total_remove=3, min_keep=0.5)
    assert sum(counts) == 3 and all(c <= 2 for c in counts)


def test_magnitude_prune_is_deterministic_without_data():
    p1 = prune(tiny_causal_lm("qwen2"), PruneConfig(heads=0.5, ffn=0.5, method="magnitude"), progress=False).plan
    p2 = prune(tiny_causal_lm("qwen2"), PruneConfig(heads=0.5, ffn=0.5, method="magnitude"), progress=False).plan
    assert p1 == p2
