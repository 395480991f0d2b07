"""sparsify: config round trip and validation, exact sparsity on tiny models, ref-model e2e."""

from __future__ import annotations

import pytest
import torch
from recording_io import RecordingIO
from tiny_models import tiny_causal_lm

from llmprune.arch import get_adapter
from llmprune.calibration.calibrate import CalibrationError
from llmprune.calibration.engine import layer_by_layer
from llmprune.sparsity import SparsityConfig, num_pruned, sparsify
from llmprune.sparsity._common import layer_targets
from llmprune.sparsity.api import _sequential


def _batches(vocab=128, n=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (n, seq), generator=g).split(2))


def test_config_json_round_trip():
    cfg = SparsityConfig(method="sparsegpt", sparsity=0.5, pattern="4:8", targets=["*.mlp.*"], n_samples=7,
                         seq_len=33, seed=3, sequential=False, blocksize=64)
    again = SparsityConfig.from_json(cfg.to_json())
    assert again == cfg and again.nm == (4, 8)
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg
    assert SparsityConfig(targets="mlp.*").targets == ["mlp.*"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "out of range"),
    (dict(sparsity=-0.2), "out of range"),
    (dict(sparsity="half"), "out of range"),
    (dict(method="obs"), "method="),
    (dict(pattern="2x4"), "pattern="),
    (dict(pattern="5:4"), "N:M"),
    (dict(pattern="2:4", sparsity=0.3), "set sparsity=0.5"),
    (dict(targets=[]), "targets"),
    (dict(n_samples=0), "n_samples"),
    (dict(per="col"), "per="),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)
    with pytest.raises(ValueError):
        SparsityConfig.from_dict({**SparsityConfig().to_dict(), **kwargs})


def test_unknown_field():
    with pytest.raises(ValueError, match="unknown SparsityConfig field"):
        SparsityConfig.from_dict({"method": "wanda", "ratio": 0.5})


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_missing_calibration_is_a_clear_error(method):
    model = tiny_causal_lm("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(CalibrationError, match="needs calibration"):
        sparsify(model, SparsityConfig(method=method), progress=False)
    with pytest.raises(CalibrationError, match="tokenizer"):
        sparsify(model, SparsityConfig(method=method), calibration="some text here", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_targets_that_match_nothing_and_indivisible_nm():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="match no linear"):
        sparsify(model, SparsityConfig(method="magnitude", targets=["*.nothing"]), progress=False)
    # hidden 64 / intermediate 96 are divisible by 8 but not by 64 -> "32:64" fails before any change
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="divisible by 64"):
        sparsify(model, SparsityConfig(method="magnitude", pattern="32:64", sparsity=0.5,
                                               targets=["*down_proj"]), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


_CASES = [("llama", method, pattern, 0.5) for method in ("magnitude", "wanda", "sparsegpt")
          for pattern in ("unstructured", "2:4")]
_CASES += [("llama", "wanda", "unstructured", 0.3), ("llama", "sparsegpt", "unstructured", 0.3),
           ("llama", "magnitude", "4:8", 0.5), ("llama", "sparsegpt", "4:8", 0.5),
           ("qwen2", "sparsegpt", "unstructured", 0.5), ("gemma2", "wanda", "2:4", 0.5),
           ("qwen3", "wanda", "4:8", 0.5)]


@pytest.mark.parametrize("model_type,method,pattern,sparsity", _CASES)
def test_exact_sparsity_on_tiny_models(model_type, method, pattern, sparsity):
    model = tiny_causal_lm(model_type)
    untouched = {n: p.clone() for n, p in model.named_parameters() if "layers" not in n or p.ndim == 1}
    cfg = SparsityConfig(method=method, sparsity=sparsity, pattern=pattern, blocksize=32)
    report = sparsify(model, cfg, calibration=_batches(), progress=False)
    assert len(report.layers) == 7 * 3
    for name, mod in model.named_modules():
        if name in report.layers:
            w = mod.weight
            if pattern == "unstructured":
                if method == "sparsegpt":  # adaptive: exact per layer
                    assert int((w == 0).sum()) == num_pruned(w.numel(), sparsity), name
                else:  # exact per output row
                    assert ((w == 0).sum(1) == num_pruned(w.shape[1], sparsity)).all(), name
            else:
                n, m = map(int, pattern.split(":"))
                assert ((w != 0).reshape(w.shape[0], -1, m).sum(-1) == n).all(), name
            assert report.layers[name] == pytest.approx(sparsity, abs=0.01)
    assert report.overall_sparsity == pytest.approx(sparsity, abs=0.01)
    for n, p in model.named_parameters():  # embeddings, lm_head and norms are never touched
        if n in untouched:
            assert torch.equal(p, untouched[n]), n
    out = model(_batches()[0]).logits
    assert torch.isfinite(out).all()


def test_targets_and_non_sequential():
    model = tiny_causal_lm("llama")
    cfg = SparsityConfig(method="wanda", sparsity=0.5, targets=["mlp.*"], sequential=False)
    report = sparsify(model, cfg, calibration=torch.cat(_batches()), progress=False)
    assert sorted({n.split(".")[-1] for n in report.layers}) == ["down_proj", "gate_proj", "up_proj"]
    assert float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) < 0.01


def test_sequential_changes_later_layers_only():
    a, b = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    for model, seq in ((a, True), (b, False)):
        sparsify(model, SparsityConfig(method="wanda", sequential=seq), calibration=_batches(), progress=False)
    la, lb = a.model.layers, b.model.layers
    assert torch.equal(la[0].self_attn.q_proj.weight, lb[0].self_attn.q_proj.weight)  # same input to layer 0
    assert not torch.equal(la[2].mlp.down_proj.weight, lb[2].mlp.down_proj.weight)


def test_deterministic():
    ws = []
    for _ in range(2):
        model = tiny_causal_lm("llama")
        sparsify(model, SparsityConfig(method="sparsegpt", pattern="2:4", targets=["*down_proj"]),
                         calibration=_batches(), progress=False)
        ws.append(model.model.layers[1].mlp.down_proj.weight.clone())
    assert torch.equal(*ws)


def test_ref_model_end_to_end_generation(ref_model, shared_dir):
    model, tok = ref_model
    # a slice of the calibration text keeps tokenization fast (the file is 5 MB)
    calib = (shared_dir / "data" / "reference-train.txt").read_text(encoding="utf-8")[:20000]
    cfg = SparsityConfig(method="wanda", sparsity=0.5, pattern="2:4", n_samples=4, seq_len=64)
    report = sparsify(model, cfg, tokenizer=tok, calibration=calib, progress=False)
    assert report.overall_sparsity == pytest.approx(0.5)
    assert len(report.layers) == 6 * 7
    q = model.model.layers[3].self_attn.q_proj.weight
    assert ((q != 0).reshape(q.shape[0], -1, 4).sum(-1) == 2).all()
    ids = tok("The history of the city", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(out[0]), str)
    assert "\"method\": \"wanda\"" in report.to_json()


def _handed_on(model, batches):
    io = RecordingIO()
    for _ in layer_by_layer(model, get_adapter(model), batches, layer_io=io, progress=False):
        pass
    return io.left


@pytest.mark.parametrize("sequential", [True, False])
def test_pruning_runs_on_the_engine_feeding_pruned_or_dense_outputs_on(sequential):
    """sequential: each layer hands on its pruned outputs (those of the pruned model); otherwise the outputs
    gathered before pruning, i.e. the dense model's."""
    model, dense, batches = tiny_causal_lm("llama"), tiny_causal_lm("llama"), _batches()
    cfg = SparsityConfig(method="wanda", sequential=sequential, targets=["*.mlp.*"])
    io = RecordingIO()
    targets = layer_targets(model, get_adapter(model).decoder_layers(model), cfg.targets)
    _sequential(model, get_adapter(model), targets, batches, cfg, False, None, [0.5] * len(targets), layer_io=io)
    assert io.entered == [0] + list(range(len(targets)))  # layer 0 once more for the capture pass
    expected = _handed_on(model if sequential else dense, batches)
    assert io.left.keys() == expected.keys()
    for i, hidden in io.left.items():
        assert all(torch.equal(a, b) for a, b in zip(hidden, expected[i], strict=True)), i
    assert not all(torch.equal(a, b) for a, b in zip(_handed_on(model, batches)[2], _handed_on(dense, batches)[2]))
