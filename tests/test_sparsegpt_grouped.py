"""SparseGPT on linears sharing one input: the grouped solve equals the per-linear solves, alone and in
the sparsify pipeline (Llama: q/k/v and gate/up share inputs; GPT-2: fused Conv1D, nothing shared)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_causal_lm

from llmprune.sparsity import SparsityConfig, sparsegpt_prune, sparsify
from llmprune.sparsity import api, sparsegpt
from llmprune.sparsity.sparsegpt import _kth_bracketed, _kth_smallest, sparsegpt_prune_group

SETTINGS = [(0.5, None), (0.7, None), (0.5, (2, 4))]


def _inputs(cols, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)
    return 2 * x.double().T @ x.double() / tokens, g


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("sizes,cols", [((48, 16, 16), 64), ((40, 40), 200), ((8,), 32)])
def test_grouped_solve_equals_per_linear_solves(setting, sizes, cols):
    sparsity, nm = setting
    H, g = _inputs(cols, 3 * cols, seed=cols)
    weights = [torch.randn(n, cols, generator=g) for n in sizes]
    grouped = sparsegpt_prune_group(weights, H, sparsity, nm=nm, blocksize=64)
    for w, (new_w, keep) in zip(weights, grouped):
        ref_w, ref_keep = sparsegpt_prune(w, H, sparsity, nm=nm, blocksize=64)
        assert torch.equal(keep, ref_keep)
        torch.testing.assert_close(new_w, ref_w, rtol=1e-6, atol=1e-6)
        assert new_w.dtype == w.dtype and (new_w[~keep] == 0).all()


def test_grouped_solve_rejects_mismatched_inputs():
    H, _ = _inputs(16, 64, seed=0)
    with pytest.raises(ValueError, match="matrices"):
        sparsegpt_prune_group([torch.randn(4, 16), torch.randn(4, 8)], H, 0.5)
    assert sparsegpt_prune_group([], H, 0.5) == []


@pytest.mark.parametrize("kind", ["randn", "ties", "zeros"])
def test_kth_smallest_is_exact(kind):
    g = torch.Generator().manual_seed(1)
    for n in (100, 9000, 60000, 100000):  # 100000: above _DIRECT_SELECT (NumPy's selection on CPU)
        x = torch.randn(n, generator=g, dtype=torch.float64).square()
        if kind == "ties":
            x = (x * 4).round()
        elif kind == "zeros":
            x[: n // 2] = 0
        for k in (1, n // 4, n // 2, n - 1, n):
            expected = float(torch.kthvalue(x, k).values)
            assert float(_kth_smallest(x, k)) == expected
            assert float(_kth_bracketed(x, k)) == expected  # the selection used off CPU


class _PerModule(api._SharedInputs):
    """The former pipeline: statistics and a solve per module."""

    def __init__(self, make, share=True):
        super().__init__(make, share=False)


def _batches(vocab=128, n=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (n, seq), generator=g).split(2))


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_pipeline_grouped_equals_per_module(model_type, pattern, sequential, monkeypatch):
    cfg = SparsityConfig(method="sparsegpt", sparsity=0.5, pattern=pattern, sequential=sequential)
    grouped = tiny_causal_lm(model_type)
    per_module = tiny_causal_lm(model_type)
    per_module.load_state_dict(grouped.state_dict())
    calls = []
    real = sparsegpt.sparsegpt_prune_group  # what the registered sparsegpt method solves with
    monkeypatch.setattr(sparsegpt, "sparsegpt_prune_group",
                        lambda ws, *a, **k: calls.append(len(ws)) or real(ws, *a, **k))
    sparsify(grouped, cfg, calibration=_batches(), progress=False)
    if model_type == "llama":
        assert 3 in calls and 2 in calls  # q/k/v and gate/up solved together
    else:
        assert set(calls) == {1}  # GPT-2: c_attn is one fused Conv1D, c_fc has its own input: no joint solve
    monkeypatch.setattr(api, "_SharedInputs", _PerModule)
    sparsify(per_module, cfg, calibration=_batches(), progress=False)
    b = dict(per_module.named_parameters())
    for name, p in grouped.named_parameters():
        assert torch.equal(p == 0, b[name] == 0), name
        torch.testing.assert_close(p, b[name], rtol=1e-5, atol=1e-6)


def test_shared_inputs_fall_back_when_sharing_changes():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    shared = api._SharedInputs(lambda m: api.InputStats())
    x = torch.randn(3, 4)
    shared.update(a, x)
    shared.update(b, x)
    shared.next_batch()
    assert shared.consistent and [len(m) for m, _ in shared.groups([a, b])] == [2]
    shared.update(a, x)
    shared.update(b, x.clone())  # another tensor: b no longer shares a's input
    assert not shared.consistent
