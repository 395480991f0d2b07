"""A model dispatched with accelerate (``device_map`` with ``"cpu"`` and ``"disk"`` layers, ``cpu_offload``)
is pruned and sparsified by the streaming entry points into the same tensors as the plainly loaded model in
memory, one decoder layer materialised at a time, leaving the dispatched model as it was; the in-place API
refuses it clearly, and so does the streaming API when offloaded weights have lost their hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from accelerate.hooks import remove_hook_from_submodules
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune import DispatchedModelError, PruneConfig, load_model, prune, save_pruned
from llmprune.arch import get_adapter
from llmprune.checkpoint.dispatched import ModelSource
from llmprune.sparsity import SparsityConfig, sparsify
from llmprune.streaming import LayerStream, prune_streaming, sparsify_streaming

from test_streaming import _assert_same_output
from tiny_models import tiny_causal_lm

IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
FAMILIES = ["llama", "gpt2"]  # gpt2: Conv1D projections and a tied output head
DISPATCH = ["device_map", "cpu_offload"]


def _source(tmp_path: Path, model_type: str) -> Path:
    src = tmp_path / f"src-{model_type}"
    tiny_causal_lm(model_type, num_hidden_layers=4).save_pretrained(src)
    return src


def _device_map(model: torch.nn.Module) -> dict[str, str]:
    """Odd decoder layers on disk, even ones on cpu; an untied output head on disk too, the rest on cpu."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = [names[id(layer)] for layer in get_adapter(model).decoder_layers(model)]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head = names[id(model.get_output_embeddings())]
    out: dict[str, str] = {}

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for n, child in module.named_children():
            full = prefix + n
            if full in layers:
                out[full] = "disk" if layers.index(full) % 2 else "cpu"
            elif any(name.startswith(full + ".") for name in layers):
                visit(child, full + ".")
            else:
                out[full] = "disk" if full == head and not tied else "cpu"

    visit(model, "")
    return out


def _dispatched(src: Path, how: str, tmp_path: Path) -> torch.nn.Module:
    if how == "cpu_offload":  # every weight in a CPU dict held by per-module hooks
        model = AutoModelForCausalLM.from_pretrained(src)
        cpu_offload(model, execution_device="cpu")
    else:  # the loader's own dispatch: odd layers read from the offload folder / checkpoint on every forward
        plain = AutoModelForCausalLM.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, device_map=_device_map(plain),
                                                     offload_folder=str(tmp_path / "offload"))
    model.eval()
    assert any(p.device.type == "meta" for p in model.parameters())
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS[:2, :16]).logits


def _in_memory(src: Path, job: PruneConfig | SparsityConfig, out: Path) -> Path:
    model, _ = load_model(src, with_tokenizer=False)
    if isinstance(job, PruneConfig):
        result = prune(model, job, calibration=IDS, progress=False)
        return save_pruned(model, out, config=job, plan=result.plan)
    sparsify(model, job, calibration=IDS, progress=False)
    return save_pruned(model, out)


def _streamed(model: torch.nn.Module, job: PruneConfig | SparsityConfig, out: Path):
    run = prune_streaming if isinstance(job, PruneConfig) else sparsify_streaming
    return run(model, job, out, calibration=IDS, progress=False)


JOBS = {
    "wanda-uniform-25": PruneConfig(heads=0.25, ffn=0.25, method="wanda", n_samples=4, seq_len=32),
    "wanda-global": PruneConfig(heads=0.5, ffn=0.5, method="wanda", allocation="global", n_samples=4, seq_len=32),
    "sparsity-wanda-50": SparsityConfig(method="wanda", sparsity=0.5, n_samples=4, seq_len=32),
    "sparsity-sparsegpt-2:4": SparsityConfig(method="sparsegpt", pattern="2:4", sparsity=0.5, n_samples=4,
                                             seq_len=32),
}


@pytest.mark.parametrize("how", DISPATCH)
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("job", list(JOBS))
def test_dispatched_model_streams_to_the_in_memory_output(tmp_path, job, model_type, how):
    """Bit-identical tensors and config (same dtype, same passes: no tolerance needed); the dispatched
    model still computes the same logits and keeps its weights offloaded."""
    src = _source(tmp_path, model_type)
    mem = _in_memory(src, JOBS[job], tmp_path / "mem")
    model = _dispatched(src, how, tmp_path)
    before = _logits(model)
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    res = _streamed(model, JOBS[job], tmp_path / "out")
    _assert_same_output(mem, res.out)
    assert torch.equal(_logits(model), before)
    assert [n for n, p in model.named_parameters() if p.device.type == "meta"] == offloaded


def test_at_most_one_decoder_layer_is_materialised(tmp_path, monkeypatch):
    """Instrument the streaming hooks: whenever a layer is entered, at most one decoder layer of the skeleton
    holds real weights, and every read of the dispatched model's weights stays inside one decoder layer."""
    src = _source(tmp_path, "llama")
    model = _dispatched(src, "device_map", tmp_path)
    prefixes = [f"model.layers.{i}." for i in range(4)]
    peaks, reads = [], []
    enter, read = LayerStream.enter, ModelSource.read

    def counting_enter(self, i, layer):
        enter(self, i, layer)
        peaks.append(sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in self.layers))

    def recording_read(self, keys):
        reads.append({p for p in prefixes for k in keys if k.startswith(p)})
        return read(self, keys)

    monkeypatch.setattr(LayerStream, "enter", counting_enter)
    monkeypatch.setattr(ModelSource, "read", recording_read)
    cfg = PruneConfig(heads=0.5, ffn=0.5, method="wanda", allocation="global", reconstruct=True, n_samples=4,
                      seq_len=32)  # a scoring pass and a reconstructing pass: two streams over the layers
    _streamed(model, cfg, tmp_path / "out")
    assert peaks and max(peaks) == 1
    assert reads and all(len(r) <= 1 for r in reads) and sum(len(r) == 1 for r in reads) == 2 * 4


def test_fresh_process_reloads_the_output_with_the_same_logits(tmp_path):
    """Standard checkpoints (uniform widths, sparsity): transformers alone reloads them, dispatched again too."""
    src = _source(tmp_path, "llama")
    model = _dispatched(src, "device_map", tmp_path)
    for name in ("wanda-uniform-25", "sparsity-sparsegpt-2:4"):
        _in_memory(src, JOBS[name], tmp_path / f"mem-{name}")
        _streamed(model, JOBS[name], tmp_path / f"out-{name}")
    check = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoConfig, AutoModelForCausalLM
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
        for name in {list(map(str, ("wanda-uniform-25", "sparsity-sparsegpt-2:4")))!r}:
            a = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/mem-" + name).eval()
            b = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/out-" + name).eval()
            c = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/out-" + name, device_map="cpu").eval()
            with torch.no_grad():
                assert torch.equal(a(ids).logits, b(ids).logits) and torch.equal(b(ids).logits, c(ids).logits)
        assert "llmprune" not in sys.modules
        print("fresh-ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fresh = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert fresh.returncode == 0 and "fresh-ok" in fresh.stdout, fresh.stderr[-2000:]


@pytest.mark.parametrize("how", DISPATCH)
def test_in_place_api_refuses_a_dispatched_model_and_names_the_streaming_call(tmp_path, how):
    model = _dispatched(_source(tmp_path, "llama"), how, tmp_path)
    before = _logits(model)
    with pytest.raises(DispatchedModelError, match=r"offloaded.*prune_streaming\(model"):
        prune(model, JOBS["wanda-uniform-25"], calibration=IDS, progress=False)
    with pytest.raises(DispatchedModelError, match=r"sparsify_streaming\(model"):
        sparsify(model, JOBS["sparsity-wanda-50"], calibration=IDS, progress=False)
    assert torch.equal(_logits(model), before)


def test_model_spread_over_devices_is_refused_in_place(tmp_path):
    """Several devices without offload (multi-GPU device_map): in-place passes would move layers off their
    devices; refused with the same pointer."""
    model, _ = load_model(_source(tmp_path, "llama"), with_tokenizer=False)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 1}
    with pytest.raises(DispatchedModelError, match="spread it over"):
        prune(model, JOBS["wanda-uniform-25"], calibration=IDS, progress=False)


def test_offloaded_weights_without_hooks_are_a_clear_error(tmp_path):
    src = _source(tmp_path, "llama")
    model = _dispatched(src, "device_map", tmp_path)
    remove_hook_from_submodules(model)  # disk-offloaded weights stay on meta, nothing can load them
    with pytest.raises(DispatchedModelError, match="no accelerate hook holds"):
        prune_streaming(model, JOBS["wanda-uniform-25"], tmp_path / "out", calibration=IDS, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    with init_empty_weights():  # meta weights that were never loaded anywhere
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    with pytest.raises(DispatchedModelError, match="no accelerate hook holds"):
        sparsify_streaming(empty, JOBS["sparsity-wanda-50"], tmp_path / "out", calibration=IDS, progress=False)


def test_interrupted_run_on_a_dispatched_model_resumes_to_the_same_output(tmp_path, monkeypatch):
    """The resume point of a model source is keyed by the model's name and tensor shapes: an interrupted
    run continues from the last finished layer to the uninterrupted run's output."""
    src = _source(tmp_path, "llama")
    model = _dispatched(src, "device_map", tmp_path)
    job = JOBS["sparsity-sparsegpt-2:4"]
    straight = _streamed(model, job, tmp_path / "straight").out
    leave = LayerStream.leave

    def interrupted(self, i, layer, hidden):
        out = leave(self, i, layer, hidden)
        if i == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(LayerStream, "leave", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _streamed(model, job, tmp_path / "out")
    monkeypatch.setattr(LayerStream, "leave", leave)
    state = json.loads((tmp_path / ".out.partial" / "stream_state.json").read_text())
    assert state["sparsify"]["next"] == 2  # layers 0 and 1 are finished and kept
    res = sparsify_streaming(model, job, tmp_path / "out", calibration=IDS, progress=False, resume=True)
    _assert_same_output(straight, res.out)
