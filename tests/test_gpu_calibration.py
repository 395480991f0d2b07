"""Calibration on a GPU with the model kept on CPU (``device="cuda"``): layers visit the GPU one at a time,
the results match the CPU run, and peak GPU memory is about one layer, not the model.

Skipped without CUDA (``-m gpu`` on a GPU machine). On CUDA the Hessians are float32 (float64 on CPU), so
SparseGPT is compared by sparsity and reconstruction quality, not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmprune import PruneConfig
from llmprune.sparsity import SparsityConfig, calibrate_activation_thresholds
from llmprune.streaming import prune_streaming, sparsify_streaming

from tiny_models import saved_tensors, tiny_causal_lm

pytestmark = pytest.mark.gpu

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _checkpoint(tmp_path: Path) -> tuple[Path, int]:
    """A 6-layer tiny Llama with wide layers (so one layer is a small part of the model); its bytes."""
    model = tiny_causal_lm("llama", num_hidden_layers=6, hidden_size=128, intermediate_size=512,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="200KB")
    return src, sum(p.numel() * p.element_size() for p in model.parameters())


def test_streamed_structured_pruning_on_gpu_matches_cpu_and_holds_one_layer(tmp_path):
    src, model_bytes = _checkpoint(tmp_path)
    cfg = PruneConfig(heads=0.5, ffn=0.5, method="wanda", n_samples=8, seq_len=32)
    cpu = prune_streaming(src, cfg, tmp_path / "cpu", calibration=IDS, progress=False, device="cpu")
    torch.cuda.reset_peak_memory_stats()
    gpu = prune_streaming(src, cfg, tmp_path / "gpu", calibration=IDS, progress=False, device="cuda")
    peak = torch.cuda.max_memory_allocated()
    a, b = saved_tensors(cpu.out), saved_tensors(gpu.out)
    assert a.keys() == b.keys()
    for k in a:  # same units kept (same shapes); the kept weights are copied, not recomputed
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert json.loads((cpu.out / "config.json").read_text())["intermediate_size"] == \
        json.loads((gpu.out / "config.json").read_text())["intermediate_size"]
    assert peak < model_bytes / 2, (peak, model_bytes)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_streamed_sparsegpt_on_gpu_matches_cpu_quality(tmp_path, pattern):
    src, model_bytes = _checkpoint(tmp_path)
    kw = dict(method="sparsegpt", sparsity=0.5, n_samples=8, seq_len=32)
    cfg = SparsityConfig(pattern=pattern, **kw) if pattern else SparsityConfig(**kw)
    cpu = sparsify_streaming(src, cfg, tmp_path / "cpu", calibration=IDS, progress=False, device="cpu")
    torch.cuda.reset_peak_memory_stats()
    gpu = sparsify_streaming(src, cfg, tmp_path / "gpu", calibration=IDS, progress=False, device="cuda")
    peak = torch.cuda.max_memory_allocated()
    assert gpu.report["overall_sparsity"] == pytest.approx(cpu.report["overall_sparsity"])
    a, b = saved_tensors(cpu.out), saved_tensors(gpu.out)
    agree = [float(((a[k] == 0) == (b[k] == 0)).float().mean()) for k in a if ".layers." in k and a[k].dim() == 2]
    assert min(agree) > 0.98  # float32 Hessians on CUDA: a few near-tied choices may flip
    assert peak < model_bytes / 2, (peak, model_bytes)
    assert all(p.device.type == "cpu" for p in b.values())


def test_activation_thresholds_on_gpu_match_cpu():
    model = tiny_causal_lm("llama")  # stays on CPU; each layer visits the GPU
    batches = list(IDS.split(4))
    kw = dict(calibration=batches, sparsity=0.4, progress=False)
    cpu = calibrate_activation_thresholds(model, **kw)
    for staged in (True, False):  # paused forwards in worker threads, and the per-stage passes
        gpu = calibrate_activation_thresholds(model, device="cuda", staged=staged, **kw)
        assert gpu.keys() == cpu.keys()
        for k in cpu:
            assert gpu[k] == pytest.approx(cpu[k], rel=5e-3), k
    assert all(p.device.type == "cpu" for p in model.parameters())
