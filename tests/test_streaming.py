"""The streaming path (one decoder layer in memory at a time) writes the same tensors as the in-memory path,
on every family, for structured pruning and weight sparsity; a run killed after layer k resumes to the same
output; bad input fails clearly and loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmprune import PruneConfig, load_model, prune
from llmprune.calibration.calibrate import CalibrationError
from llmprune.checkpoint.io import CheckpointError, OutputExistsError, save_pruned
from llmprune.sparsity import SparsityConfig, calibrate_activation_thresholds, read_activation_thresholds, sparsify
from llmprune.streaming import StreamingError, parse_memory, prune_streaming, should_stream, sparsify_streaming

from tiny_models import CAUSAL_LM_TYPES, LIGHT_VARIANTS, saved_tensors, tiny_causal_lm

IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _assert_same_output(a: Path, b: Path) -> None:
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb


def _checkpoint(tmp_path: Path, model_type: str, **overrides) -> Path:
    src = tmp_path / f"src-{model_type.replace(':', '-')}"
    tiny_causal_lm(model_type, **overrides).save_pretrained(src, max_shard_size="20KB")  # sharded, with an index
    return src


def _in_memory_prune(src: Path, cfg: PruneConfig, out: Path, calibration=IDS) -> Path:
    model, _ = load_model(src, with_tokenizer=False)
    result = prune(model, cfg, calibration=calibration, progress=False)
    return save_pruned(model, out, config=cfg, plan=result.plan)


FAMILIES = [t for t in CAUSAL_LM_TYPES if t not in LIGHT_VARIANTS]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_streamed_reconstruction_equals_in_memory_on_every_family(tmp_path, model_type):
    src = _checkpoint(tmp_path, model_type)
    heads = 0.0 if model_type == "falcon" else 0.5  # multi-query Falcon has one KV group: nothing to remove
    cfg = PruneConfig(heads=heads, ffn=0.25, method="wanda", n_samples=4, seq_len=32, reconstruct=True)
    mem = _in_memory_prune(src, cfg, tmp_path / "mem")
    res = prune_streaming(src, cfg, tmp_path / "str", calibration=IDS, progress=False)
    _assert_same_output(mem, res.out)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


MODES = {
    "uniform": dict(heads=0.5, ffn=0.25, method="wanda"),
    "global": dict(heads=0.5, ffn=0.5, method="wanda", allocation="global"),
    "magnitude-no-data": dict(heads=0.5, ffn=0.25, method="magnitude"),
    "error+reconstruct": dict(heads=0.5, ffn=0.5, method="wanda", allocation="error", reconstruct=True),
    "block_influence": dict(heads=0.5, ffn=0.5, method="flap", allocation="block_influence"),
    "bias-compensation": dict(heads=0.5, ffn=0.25, method="flap", bias_compensation=True),
    "bias+reconstruct": dict(heads=0.5, ffn=0.25, method="wanda", bias_compensation=True, reconstruct=True),
    # the default method: obs with its fisher allocation (a layer-by-layer Fisher pass, a pricing pass, the cut)
    "obs-fisher": dict(heads=0.5, ffn=0.25, batch_size=2, fisher_samples=2),
    "obs-fisher-data-diagonal": dict(heads=0.5, ffn=0.5, fisher_labels="data", fisher_diagonal=True),
    "obs-error": dict(heads=0.5, ffn=0.5, allocation="error"),
    "obs-uniform+bias": dict(heads=0.5, ffn=0.25, allocation="uniform", bias_compensation=True),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_structured_modes_equal_in_memory(tmp_path, mode, tied):
    src = _checkpoint(tmp_path, "llama", num_hidden_layers=4, tie_word_embeddings=tied)
    cfg = PruneConfig(n_samples=4, seq_len=32, **MODES[mode])
    mem = _in_memory_prune(src, cfg, tmp_path / "mem")
    res = prune_streaming(src, cfg, tmp_path / "str", calibration=IDS, progress=False)
    _assert_same_output(mem, res.out)
    assert ("lm_head.weight" in saved_tensors(res.out)) is not tied


SPARSITY = {
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "wanda-2:4": dict(method="wanda", pattern="2:4", sparsity=0.5),
    "alps-60": dict(method="alps", sparsity=0.6),
    "magnitude-60": dict(method="magnitude", sparsity=0.6),
}


@pytest.mark.parametrize("name,model_type", [(n, t) for n in SPARSITY for t in ("llama", "qwen2", "gpt2")
                                             if not (n.startswith("alps") and t != "llama")]
                         + [pytest.param("alps-60", t, marks=pytest.mark.slow) for t in ("qwen2", "gpt2")])
def test_streamed_sparsity_equals_in_memory(tmp_path, name, model_type):
    src = _checkpoint(tmp_path, model_type)
    cfg = SparsityConfig(n_samples=4, seq_len=32, **SPARSITY[name])
    model, _ = load_model(src, with_tokenizer=False)
    report = sparsify(model, cfg, calibration=IDS, progress=False)
    save_pruned(model, tmp_path / "mem")
    res = sparsify_streaming(src, cfg, tmp_path / "str", calibration=IDS, progress=False)
    _assert_same_output(tmp_path / "mem", res.out)
    assert res.report["overall_sparsity"] == pytest.approx(report.overall_sparsity)


@pytest.mark.parametrize("job", ["sparsegpt", "wanda-structured"])
def test_streamed_layers_leave_no_autograd_graph_behind(tmp_path, monkeypatch, job):
    """Memory grows with one layer, not the model: nothing a finished layer computed may keep its weights or
    activations alive (an autograd graph on the hidden states did, 78 MB per layer of a 0.1B model)."""
    from llmprune.streaming import LayerStream

    seen = []
    leave = LayerStream.leave

    def checked(self, i, layer, hidden):
        seen.append([h.requires_grad or h.grad_fn is not None for h in hidden])
        return leave(self, i, layer, hidden)

    monkeypatch.setattr(LayerStream, "leave", checked)
    src = _checkpoint(tmp_path, "llama")
    if job == "sparsegpt":
        sparsify_streaming(src, SparsityConfig(method="sparsegpt", sparsity=0.5, n_samples=4, seq_len=32),
                           tmp_path / "o", calibration=IDS, progress=False)
    else:
        prune_streaming(src, PruneConfig(heads=0.5, ffn=0.5, method="wanda", n_samples=4, seq_len=32),
                        tmp_path / "o", calibration=IDS, progress=False)
    assert seen and not any(any(flags) for flags in seen)


def test_spilled_hidden_states_give_the_same_output(tmp_path):
    """Above a quarter of --max-memory the calibration states stay memory-mapped on disk; same output."""
    src = _checkpoint(tmp_path, "qwen2", num_hidden_layers=4)
    cfg = PruneConfig(heads=0.5, ffn=0.5, method="wanda", n_samples=4, seq_len=32, reconstruct=True)
    a = prune_streaming(src, cfg, tmp_path / "ram", calibration=IDS, progress=False)
    b = prune_streaming(src, cfg, tmp_path / "disk", calibration=IDS, progress=False, max_memory=4096)
    _assert_same_output(a.out, b.out)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_reference_model_streamed_equals_in_memory(tmp_path, ref_model_path, shared_dir, dtype):
    calib = str(shared_dir / "data" / "reference-train.txt")
    cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda", reconstruct=True, n_samples=2, seq_len=128)
    model, tok = load_model(ref_model_path, dtype=dtype)
    result = prune(model, cfg, tokenizer=tok, calibration=calib, progress=False)
    save_pruned(model, tmp_path / "mem", tokenizer=tok, config=cfg, plan=result.plan)
    res = prune_streaming(ref_model_path, cfg, tmp_path / "str", tokenizer=tok, calibration=calib, dtype=dtype,
                          progress=False)
    _assert_same_output(tmp_path / "mem", res.out)
    assert res.plan == result.plan
    scfg = SparsityConfig(method="sparsegpt", sparsity=0.5, n_samples=2, seq_len=128)
    model, _ = load_model(ref_model_path, dtype=dtype)
    sparsify(model, scfg, tokenizer=tok, calibration=calib, progress=False)
    save_pruned(model, tmp_path / "smem", tokenizer=tok)
    res = sparsify_streaming(ref_model_path, scfg, tmp_path / "sstr", tokenizer=tok, calibration=calib, dtype=dtype,
                             progress=False)
    _assert_same_output(tmp_path / "smem", res.out)


# ---- kill after layer k, resume ------------------------------------------------------------------------------
_KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from llmprune import PruneConfig
    from llmprune.sparsity import SparsityConfig
    from llmprune import streaming
    kind, phase, k = {kind!r}, {phase!r}, {k}
    original = streaming.LayerStream.leave
    def leave(self, i, layer, hidden):
        out = original(self, i, layer, hidden)
        if self.phase == phase and i == k:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after layer k was finished
        return out
    streaming.LayerStream.leave = leave
    commit = streaming.resume.DiskStore.commit
    def committed(self):  # the Fisher pass: killed once its backward has reached layer k
        commit(self)
        if phase == "fisher" and self.state.get("backward_next") == k:
            os.kill(os.getpid(), signal.SIGKILL)
    streaming.resume.DiskStore.commit = committed
    ids = torch.load({ids!r}, weights_only=True)
    if kind == "prune":
        streaming.prune_streaming({src!r}, PruneConfig(**{cfg!r}), {out!r}, calibration=ids, progress=False,
                                  resume={resume!r})
    else:
        streaming.sparsify_streaming({src!r}, SparsityConfig(**{cfg!r}), {out!r}, calibration=ids,
                                     progress=False, resume={resume!r}, activation_sparsity={act!r})
""")

KILLS = {
    "reconstruct-cut": ("prune", "cut", dict(heads=0.5, ffn=0.5, method="wanda", reconstruct=True, n_samples=4,
                                             seq_len=32)),
    "global-score": ("prune", "score", dict(heads=0.5, ffn=0.5, method="wanda", allocation="global", n_samples=4,
                                            seq_len=32)),
    "error-cut": ("prune", "cut", dict(heads=0.5, ffn=0.5, method="wanda", allocation="error", reconstruct=True,
                                       n_samples=4, seq_len=32)),
    "bias-compensation-cut": ("prune", "cut", dict(heads=0.5, ffn=0.5, method="flap", bias_compensation=True,
                                                   n_samples=4, seq_len=32)),
    "obs-fisher": ("prune", "fisher", dict(heads=0.5, ffn=0.5, n_samples=4, seq_len=32, batch_size=2,
                                           fisher_samples=2)),
    "obs-price": ("prune", "price", dict(heads=0.5, ffn=0.5, n_samples=4, seq_len=32)),
    "obs-cut": ("prune", "cut", dict(heads=0.5, ffn=0.5, n_samples=4, seq_len=32)),
    "sparsegpt": ("sparsify", "sparsify", dict(method="sparsegpt", sparsity=0.5, n_samples=4, seq_len=32)),
    # the second pass of --activation-sparsity (TEAL thresholds of the written layers)
    "activation": ("sparsify", "activation", dict(method="wanda", sparsity=0.5, n_samples=4, seq_len=32)),
}


@pytest.mark.parametrize("case", [c if c in ("reconstruct-cut", "global-score", "sparsegpt", "activation",
                                            "obs-fisher", "obs-cut")
                                  else pytest.param(c, marks=pytest.mark.slow) for c in KILLS])
def test_killed_run_resumes_to_the_uninterrupted_output(tmp_path, case):
    kind, phase, cfg = KILLS[case]
    act = 0.4 if phase == "activation" else 0.0
    src = _checkpoint(tmp_path, "llama", num_hidden_layers=6)
    torch.save(IDS, tmp_path / "ids.pt")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out: Path, resume: bool, kill_after: int) -> subprocess.CompletedProcess:
        code = _KILLER.format(tests=tests, kind=kind, phase=phase if kill_after >= 0 else "-", k=kill_after,
                              ids=str(tmp_path / "ids.pt"), src=str(src), cfg=cfg, out=str(out), resume=resume,
                              act=act)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    if kind == "prune":
        prune_streaming(src, PruneConfig(**cfg), tmp_path / "straight", calibration=IDS, progress=False)
    else:
        sparsify_streaming(src, SparsityConfig(**cfg), tmp_path / "straight", calibration=IDS, progress=False,
                           activation_sparsity=act)
    killed = run(tmp_path / "out", False, 2)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL
    partial = tmp_path / ".out.partial"
    state = json.loads((partial / "stream_state.json").read_text())
    done = state[phase]["backward_next"] == 2 if phase == "fisher" else state[phase]["next"] == 3
    assert done and not (tmp_path / "out").exists()
    with pytest.raises(OutputExistsError, match="resume"):  # without resume: refused, the saved work is kept
        if kind == "prune":
            prune_streaming(src, PruneConfig(**cfg), tmp_path / "out", calibration=IDS, progress=False)
        else:
            sparsify_streaming(src, SparsityConfig(**cfg), tmp_path / "out", calibration=IDS, progress=False,
                               activation_sparsity=act)
    assert (partial / "stream_state.json").is_file()
    resumed = run(tmp_path / "out", True, -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_output(tmp_path / "straight", tmp_path / "out")
    if act:
        assert read_activation_thresholds(tmp_path / "out") == read_activation_thresholds(tmp_path / "straight")
    assert not partial.exists()


@pytest.mark.parametrize("model_type,method,sparsity", [("llama", "sparsegpt", 0.5), ("gpt2", "wanda", 0.0),
                                                        ("qwen2", "magnitude", 0.5)])
def test_streamed_activation_thresholds_equal_in_memory(tmp_path, model_type, method, sparsity):
    """--activation-sparsity with --streaming: the thresholds of the in-memory sparsified model, same weights."""
    src = _checkpoint(tmp_path, model_type)
    cfg = SparsityConfig(method=method, sparsity=sparsity, n_samples=4, seq_len=32)
    model, _ = load_model(src, with_tokenizer=False)
    sparsify(model, cfg, calibration=IDS, progress=False)
    expected = calibrate_activation_thresholds(model, calibration=IDS, sparsity=0.4, n_samples=4, seq_len=32,
                                               progress=False)
    save_pruned(model, tmp_path / "mem")
    res = sparsify_streaming(src, cfg, tmp_path / "str", calibration=IDS, progress=False, activation_sparsity=0.4)
    _assert_same_output(tmp_path / "mem", res.out)
    assert res.report["activation_sparsity"] == {"target": 0.4, "thresholds": expected}
    assert read_activation_thresholds(res.out) == expected and all(t > 0 for t in expected.values())
    with pytest.raises(CalibrationError, match="activation sparsity needs calibration"):
        sparsify_streaming(src, SparsityConfig(method="magnitude", sparsity=0.5), tmp_path / "x", progress=False,
                           activation_sparsity=0.4)
    with pytest.raises(ValueError, match="activation_sparsity"):
        sparsify_streaming(src, cfg, tmp_path / "x", calibration=IDS, progress=False, activation_sparsity=1.0)
    assert not (tmp_path / "x").exists()


def test_resume_refuses_state_of_other_settings(tmp_path):
    src = _checkpoint(tmp_path, "llama", num_hidden_layers=4)
    cfg = PruneConfig(heads=0.5, ffn=0.5, method="wanda", reconstruct=True, n_samples=4, seq_len=32)
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "stream_state.json").write_text(json.dumps({"version": 1, "fingerprint": "other"}))
    with pytest.raises(StreamingError, match="other settings"):
        prune_streaming(src, cfg, tmp_path / "out", calibration=IDS, progress=False, resume=True)
    assert partial.is_dir()


def test_bad_streaming_input_is_clear_and_loses_nothing(tmp_path):
    src = _checkpoint(tmp_path, "llama")
    with pytest.raises(StreamingError, match="own pass through the whole model"):
        prune_streaming(src, PruneConfig(ffn=0.25, method="taylor"), tmp_path / "o", calibration=IDS)
    with pytest.raises(StreamingError, match="owl"):
        sparsify_streaming(src, SparsityConfig(method="wanda", allocation="owl"), tmp_path / "o", calibration=IDS)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        prune_streaming(src, PruneConfig(ffn=0.25, method="magnitude"), tmp_path / "exists")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "x"
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        prune_streaming(src, PruneConfig(ffn=0.25, method="magnitude"), tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_memory_budget_decides_streaming(ref_model_path):
    assert parse_memory("2GB") == 2 * 10**9 and parse_memory("512MiB") == 512 << 20 and parse_memory(None) is None
    with pytest.raises(ValueError, match="24GB"):
        parse_memory("lots")
    assert should_stream(ref_model_path, parse_memory("10MB"))
    assert not should_stream(ref_model_path, parse_memory("10GB"))


def test_cli_streams_when_the_model_does_not_fit_and_output_reloads_fresh(tmp_path, ref_model_path, shared_dir):
    from llmprune.cli import main

    calib = str(shared_dir / "data" / "reference-train.txt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda", reconstruct=True, n_samples=4, seq_len=64)
    model, tok = load_model(ref_model_path)
    result = prune(model, cfg, tokenizer=tok, calibration=calib, progress=False)
    save_pruned(model, tmp_path / "mem", tokenizer=tok, config=cfg, plan=result.plan)
    base = [sys.executable, "-m", "llmprune", "prune", str(ref_model_path), "--heads", "0.25", "--ffn", "0.25",
            "--method", "wanda", "--calib", calib, "--n-samples", "4", "--seq-len", "64", "--reconstruct"]
    auto = subprocess.run(base + ["--out", str(tmp_path / "str"), "--max-memory", "20MB"], env=env,
                          capture_output=True, text=True)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "streaming it one layer at a time" in auto.stdout and "calibration tokens/s" in auto.stdout
    assert "memory budget (GB)" in auto.stdout
    _assert_same_output(tmp_path / "mem", tmp_path / "str")
    check = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        a = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'mem')!r}).eval()
        b = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'str')!r}).eval()
        ids = torch.randint(0, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(a(ids).logits, b(ids).logits)
        assert "llmprune" not in sys.modules
        print("fresh-ok")
    """)
    fresh = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert fresh.returncode == 0 and "fresh-ok" in fresh.stdout, fresh.stderr[-2000:]
    code = main(["prune", str(ref_model_path), "--ffn", "0.25", "--calib", calib, "--out", str(tmp_path / "x"),
                 "--streaming", "--ppl", calib])
    assert code == 2 and not (tmp_path / "x").exists()


def test_cli_streamed_activation_sparsity_matches_in_memory(tmp_path, ref_model_path, shared_dir):
    from llmprune.cli import main

    calib = str(shared_dir / "data" / "reference-train.txt")
    base = ["sparsify", str(ref_model_path), "--method", "wanda", "--sparsity", "0.5", "--activation-sparsity", "0.3",
            "--calib", calib, "--n-samples", "4", "--seq-len", "64", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "mem")]) == 0
    assert main(base + ["--out", str(tmp_path / "str"), "--streaming"]) == 0
    _assert_same_output(tmp_path / "mem", tmp_path / "str")
    mem, streamed = read_activation_thresholds(tmp_path / "mem"), read_activation_thresholds(tmp_path / "str")
    assert len(mem) == 6 * 7 and streamed == mem


def test_streamed_fisher_pass_keeps_only_each_layers_fisher_on_disk(tmp_path):
    """The Fisher pass's states (each layer's inputs, the gradients) go once done: the run folder then holds one
    file per layer, its Fisher, and equal values to the in-memory pass."""
    from llmprune.arch import get_adapter
    from llmprune.calibration.fisher import output_fisher
    from llmprune.streaming.resume import DiskStore, PartialOutput

    model = tiny_causal_lm("llama", num_hidden_layers=3).eval()
    adapter = get_adapter(model)
    part = PartialOutput(tmp_path / "out", "fp", resume=False, overwrite=False)
    on_disk = output_fisher(model, adapter, [IDS[:2], IDS[2:]], labels="data", store=DiskStore(part, 1))
    files = sorted(p.name for p in part.dir.glob("hidden-fisher-*.bin"))
    assert len(files) == 3 and set(part.state["fisher"]["files"]) == {"fisher-0", "fisher-1", "fisher-2"}
    in_memory = output_fisher(model, adapter, [IDS[:2], IDS[2:]], labels="data")
    for i in range(3):
        for m, f in in_memory[i].items():
            torch.testing.assert_close(on_disk[i][m], f, rtol=0, atol=0)
