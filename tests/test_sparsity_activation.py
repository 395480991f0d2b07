"""TEAL-style activation thresholds: target sparsity on calibration data, hooks, held-out sparsity, bad inputs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_causal_lm

from llmprune.calibration.calibrate import CalibrationError
from llmprune.sparsity import apply_activation_sparsity, calibrate_activation_thresholds, measure_activation_sparsity
from llmprune.sparsity.thresholds import AbsHistogram
from teal_reference import threshold_from_sample


def _batches(vocab=128, n=8, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (n, seq), generator=g).split(4))


def test_threshold_from_sample_is_exact_quantile():
    a = torch.arange(1, 101, dtype=torch.float32)  # 1..100
    t = threshold_from_sample(a, 0.25)
    assert 25 < t < 26 and int((a <= t).sum()) == 25 and int((a < t).sum()) == 25
    assert threshold_from_sample(a, 0.0) == 0.0


@pytest.mark.parametrize("data", ["normal", "lognormal", "zeros", "bf16"])
def test_histogram_threshold_is_the_quantile_of_every_value(data):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300_001, generator=g)
    if data == "lognormal":
        x = torch.exp(4 * x)  # 11 orders of magnitude
    elif data == "zeros":
        x[::2] = 0.0  # ReLU-like: the 0.25 quantile is exactly 0
    elif data == "bf16":
        x = x.bfloat16()  # many exact ties
    h = AbsHistogram()
    for chunk in x.reshape(-1).split(40_000):
        h.update(chunk.reshape(-1, 8) if chunk.numel() % 8 == 0 else chunk)
    assert h.seen == x.numel() and h.counts.numel() == 1 << 18  # fixed size, every value counted
    for s in (0.0, 0.25, 0.5, 0.9, 0.999):
        exact = threshold_from_sample(x.float().abs(), s)
        assert h.threshold(s) == pytest.approx(exact, rel=1e-3, abs=0.0), s
    assert (h.threshold(0.25) == 0.0) == (data == "zeros")
    h.all_reduce()  # a single process: unchanged
    assert h.seen == x.numel()


def _count_calls(model, suffix):
    calls = {"n": 0}
    handles = [m.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
               for n, m in model.named_modules() if n.endswith(suffix)]
    return calls, handles


@pytest.mark.parametrize("arch", ["llama", "falcon"])  # falcon: parallel attention and MLP on one input
@pytest.mark.parametrize("sequential", [True, False])
def test_thresholds_match_the_former_sampled_calibration(arch, sequential):
    import teal_reference

    model = tiny_causal_lm(arch)
    batches = _batches(n=16, seq=32)
    kw = dict(calibration=batches, sparsity=0.4, sequential=sequential, progress=False)
    ref = teal_reference.calibrate_activation_thresholds(model, **kw)  # every value fits its 2^18 sample
    down = "mlp.down_proj" if arch == "llama" else "mlp.dense_4h_to_h"
    calls, handles = _count_calls(model, down)
    new = calibrate_activation_thresholds(model, **kw)
    for h in handles:
        h.remove()
    assert new.keys() == ref.keys()
    for name in ref:
        assert new[name] == pytest.approx(ref[name], rel=0.01), name
    # passes stop once their stage has its inputs: the final projection runs once per batch and layer that
    # feeds another (formerly once per stage pass and layer), plus once in capture_layer_inputs' probe of layer 0
    n_layers = len(model.model.layers if arch == "llama" else model.transformer.h)
    assert calls["n"] == (n_layers - 1) * len(batches) + 1


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_thresholds_hit_target_on_calibration_data(sequential, target):
    model = tiny_causal_lm("llama")
    batches = _batches()
    th = calibrate_activation_thresholds(model, calibration=batches, sparsity=target, sequential=sequential,
                                         progress=False)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(th) == names and all(t > 0 for t in th.values())
    achieved = measure_activation_sparsity(model, th, batches)
    tol = 0.01 if sequential else 0.1  # non-sequential thresholds see dense inputs
    for name in names:
        assert achieved[name] == pytest.approx(target, abs=tol), name
    assert achieved["__overall__"] == pytest.approx(target, abs=tol)


def test_per_layer_targets_hooks_and_removal():
    model = tiny_causal_lm("llama")
    batches = _batches()
    th = calibrate_activation_thresholds(model, calibration=batches, sparsity={"*mlp.down_proj": 0.6, "*q_proj": 0.2},
                                         targets=["*down_proj", "*q_proj", "*k_proj"], progress=False)
    assert all(th[n] == 0.0 for n in th if n.endswith("k_proj"))
    assert len(th) == 9
    x = batches[0]
    dense = model(x).logits
    with apply_activation_sparsity(model, th, track=True) as h:
        sparse = model(x).logits
        got = h.achieved()
    assert not torch.allclose(dense, sparse)
    assert torch.equal(model(x).logits, dense)  # hooks removed
    down = [v for n, v in got.items() if n.endswith("down_proj")]
    assert all(abs(v - 0.6) < 0.15 for v in down)


def test_ref_model_thresholds_generalise_to_held_out_text(ref_model, shared_dir):
    model, tok = ref_model
    calib = (shared_dir / "data" / "reference-train.txt").read_text(encoding="utf-8")[:30000]
    held_out = (shared_dir / "data" / "wikitext2-raw-test.txt").read_text(encoding="utf-8")[:30000]
    th = calibrate_activation_thresholds(model, tok, calib, sparsity=0.4, n_samples=4, seq_len=128, progress=False)
    assert len(th) == 6 * 7 and all(k.startswith("model.layers.") for k in th)
    on_calib = measure_activation_sparsity(model, th, calib, tokenizer=tok, n_samples=4, seq_len=128, seed=0)
    assert on_calib["__overall__"] == pytest.approx(0.4, abs=0.01)
    held = measure_activation_sparsity(model, th, held_out, tokenizer=tok, n_samples=4, seq_len=128, seed=1)
    assert held["__overall__"] == pytest.approx(0.4, abs=0.05)
    ids = tok("The history of the city", return_tensors="pt")
    with apply_activation_sparsity(model, th):
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_bad_inputs():
    model = tiny_causal_lm("llama")
    for bad in (1.0, -0.1, {"*q_proj": 1.5}, "0.3"):
        with pytest.raises(ValueError, match="activation sparsity"):
            calibrate_activation_thresholds(model, calibration=_batches(), sparsity=bad, progress=False)
    with pytest.raises(CalibrationError, match="needs calibration"):
        calibrate_activation_thresholds(model, sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="match no linear"):
        calibrate_activation_thresholds(model, calibration=_batches(), targets=["*nothing"], progress=False)
    with pytest.raises(KeyError, match="unknown module"):
        apply_activation_sparsity(model, {"model.layers.0.nope": 0.1})
    with pytest.raises(ValueError, match="must be >= 0"):
        apply_activation_sparsity(model, {"model.layers.0.mlp.down_proj": -1.0})


def _layer_calls(model):
    """Forward pre-hook counts of every decoder layer (paused forwards count as started)."""
    from llmprune.arch import get_adapter

    layers = get_adapter(model).decoder_layers(model)
    calls = [0] * len(layers)
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    return calls, handles


@pytest.mark.parametrize("arch", ["llama", "falcon", "gpt2", "phi3", "qwen3_moe"])
def test_staged_calibration_equals_one_pass_per_stage(arch):
    """Paused forwards (one per batch and layer) give bit-identical thresholds to re-running each stage."""
    if arch == "qwen3_moe":
        from tiny_models import tiny_moe

        model = tiny_moe(arch)
    else:
        model = tiny_causal_lm(arch)
    batches = _batches(n=12, seq=16)
    kw = dict(calibration=batches, sparsity=0.45, progress=False)
    calls, handles = _layer_calls(model)
    staged = calibrate_activation_thresholds(model, staged=True, **kw)
    staged_calls = list(calls)
    calls[:] = [0] * len(calls)
    passes = calibrate_activation_thresholds(model, staged=False, **kw)
    for h in handles:
        h.remove()
    assert staged == passes and all(t > 0 for t in staged.values())
    # one forward per batch and layer (capture_layer_inputs' pass-through and its probe of layer 0 also count
    # as calls); the stage passes run more
    n = len(batches)
    assert staged_calls == [2 * n + 1] + [2 * n] * (len(calls) - 1)
    assert calls[1] > 2 * n
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("llmprune-calibration")]


def test_staged_falls_back_to_stage_passes_when_paused_forwards_do_not_fit(monkeypatch):
    import llmprune.core.memory

    model = tiny_causal_lm("llama")
    batches = _batches()
    kw = dict(calibration=batches, sparsity=0.3, progress=False)
    expected = calibrate_activation_thresholds(model, staged=True, **kw)
    monkeypatch.setattr(llmprune.core.memory, "available_memory", lambda: 1024)
    calls, handles = _layer_calls(model)
    got = calibrate_activation_thresholds(model, **kw)  # staged=None: decided per layer
    for h in handles:
        h.remove()
    assert got == expected and calls[1] > 2 * len(batches)
    calls, handles = _layer_calls(model)
    got = calibrate_activation_thresholds(model, max_memory=1 << 40, **kw)  # an explicit budget decides instead
    for h in handles:
        h.remove()
    assert got == expected and calls[1] == 2 * len(batches)


class _Routed(torch.nn.Module):
    """Three linears; even batches skip ``b`` (data-dependent routing), odd ones call ``a``, ``b``, ``c``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, batch):
        x = self.a(x)
        if batch % 2:
            x = self.b(x)
        return self.c(x)


def test_run_staged_with_routing_calibrates_each_target_on_every_batch_reaching_it():
    from llmprune.sparsity._staged import run_staged

    layer = _Routed()
    inputs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(b)) for b in range(5)]
    seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    order: list[str] = []

    def finalize(full):
        order.append(full)
        return 0.1

    outs, unreached = run_staged(lambda b: layer(inputs[b], b), len(inputs),
                                 [("a", layer.a), ("b", layer.b), ("c", layer.c)],
                                 record=lambda full, x, b: seen[full].append(b), finalize=finalize,
                                 sparsify=torch.nn.functional.hardshrink, keep_outputs=True)
    assert order == ["a", "b", "c"] and unreached == []
    # c is reached by the even batches while the odd ones wait at b: recorded out of batch order
    assert {k: sorted(v) for k, v in seen.items()} == {"a": [0, 1, 2, 3, 4], "b": [1, 3], "c": [0, 1, 2, 3, 4]}
    # outputs: those of the plain forward with every threshold applied as a pre-hook
    hooks = [m.register_forward_pre_hook(lambda m, a: (torch.nn.functional.hardshrink(a[0], 0.1),))
             for m in (layer.a, layer.b, layer.c)]
    try:
        for b, x in enumerate(inputs):
            assert torch.equal(outs[b], layer(x, b))
    finally:
        for h in hooks:
            h.remove()
    # a target no batch reaches is reported
    _, unreached = run_staged(lambda b: layer(inputs[b], 0), 2, [("b", layer.b), ("c", layer.c)],
                              record=lambda *a: None, finalize=lambda full: 0.0,
                              sparsify=torch.nn.functional.hardshrink, keep_outputs=False)
    assert unreached == ["b"]


def test_run_staged_error_in_one_forward_unwinds_every_paused_one():
    import threading

    from llmprune.sparsity._staged import run_staged

    layer = _Routed()
    inputs = [torch.randn(4, 8) for _ in range(4)]

    def forward(b):
        x = layer.a(inputs[b])
        if b == 2:
            raise RuntimeError("boom in batch 2")
        return layer.c(x)

    with pytest.raises(RuntimeError, match="boom in batch 2"):
        run_staged(forward, len(inputs), [("a", layer.a), ("c", layer.c)], record=lambda *a: None,
                   finalize=lambda full: 0.0, sparsify=torch.nn.functional.hardshrink, keep_outputs=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("llmprune-calibration")]
    assert not layer.a._forward_pre_hooks and not layer.c._forward_pre_hooks
    with pytest.raises(ValueError, match="bad threshold"):  # a failing finalize unwinds them too
        run_staged(lambda b: layer(inputs[b], 1), len(inputs), [("a", layer.a)], record=lambda *a: None,
                   finalize=lambda full: (_ for _ in ()).throw(ValueError("bad threshold")),
                   sparsify=torch.nn.functional.hardshrink, keep_outputs=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("llmprune-calibration")]


@pytest.mark.parametrize("staged", [True, False])
def test_calibration_runs_on_the_engine_handing_on_the_sparsified_outputs(staged):
    """Each layer hands on its outputs with its thresholds applied; the last layer, computing nothing, its inputs."""
    from llmprune.arch import get_adapter
    from llmprune.calibration.engine import layer_by_layer
    from recording_io import RecordingIO

    model = tiny_causal_lm("llama")
    batches = list(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)).split(2))
    io = RecordingIO()
    th = calibrate_activation_thresholds(model, calibration=batches, sparsity=0.5, staged=staged, progress=False,
                                         layer_io=io)
    n = len(get_adapter(model).decoder_layers(model))
    assert io.entered == [0] + list(range(n))
    expected = RecordingIO()
    with apply_activation_sparsity(model, th):
        for _ in layer_by_layer(model, get_adapter(model), batches, layer_io=expected, progress=False):
            pass
    for i in range(n - 1):
        assert all(torch.equal(a, b) for a, b in zip(io.left[i], expected.left[i], strict=True)), i
    assert all(torch.equal(a, b) for a, b in zip(io.left[n - 1], expected.left[n - 2], strict=True))
