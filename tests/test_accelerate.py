"""Two CPU processes under ``accelerate launch`` (gloo): calibration statistics reduced across processes equal
one process's on the same total data (the output Fisher included), and pruning and recovery training run and
save once.

accelerate 1.x's ``launch --cpu --num_processes 2`` starts a *single* process unless an MPI hostfile is given,
so on this CPU-only machine two processes are started with ``--multi_gpu`` (torchrun underneath); llmprune
sees no CUDA and joins a gloo group on CPU (``llmprune.cli._common.init_distributed``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent

#: each process calibrates on its shard of the windows; rank 0 writes the reduced statistics
_STATS_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from accelerate import PartialState
from safetensors.torch import save_file
from llmprune.arch import get_adapter
from llmprune.calibration.calibrate import as_batches, layerwise_statistics, world
from llmprune.sparsity.sparsegpt import HessianAccumulator
from llmprune.calibration.fisher import output_fisher
from tiny_models import tiny_causal_lm

state = PartialState(cpu=True)
rank, size = world()
model = tiny_causal_lm("llama")
adapter = get_adapter(model)
ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
batches = list(ids[rank::size].split(2))  # this process's share of the same 8 windows
stats = layerwise_statistics(model, adapter, batches, progress=False,
                             grams_of=lambda layer: [layer.mlp.down_proj])
out = {{}}
for i, st in enumerate(stats):
    out[f"{{i}}.bi"] = torch.tensor([st.block_influence], dtype=torch.float64)
    for j, (m, s) in enumerate(st.inputs.items()):
        out[f"{{i}}.{{j}}.norm"], out[f"{{i}}.{{j}}.var"] = s.norm, s.variance
        out[f"{{i}}.{{j}}.count"] = torch.tensor([s.count])
    for m, g in st.grams.items():
        out[f"{{i}}.gram"] = g.hessian()
for i, per_layer in enumerate(output_fisher(model, adapter, batches, labels="data")):
    for j, f in enumerate(per_layer.values()):
        out[f"{{i}}.{{j}}.fisher"] = f
if rank == 0:
    save_file({{k: v.contiguous() for k, v in out.items()}}, sys.argv[1])
state.wait_for_everyone()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("accelerate CLI not installed")
    if torch.cuda.is_available():
        pytest.skip("the CPU process-group test runs on CPU-only machines")
    cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_two_process_calibration_statistics_equal_one_process(tmp_path):
    script = tmp_path / "stats.py"
    script.write_text(_STATS_SCRIPT.format(tests=str(TESTS)))
    proc = _launch([str(script), str(tmp_path / "two.safetensors")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_file(tmp_path / "two.safetensors")

    from llmprune.arch import get_adapter
    from llmprune.calibration.calibrate import layerwise_statistics

    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    stats = layerwise_statistics(model, get_adapter(model), list(ids.split(2)), progress=False,
                                 grams_of=lambda layer: [layer.mlp.down_proj])
    for i, st in enumerate(stats):
        assert abs(float(two[f"{i}.bi"]) - st.block_influence) < 1e-6
        for j, s in enumerate(st.inputs.values()):
            assert int(two[f"{i}.{j}.count"]) == s.count == 8 * 12
            torch.testing.assert_close(two[f"{i}.{j}.norm"], s.norm, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(two[f"{i}.{j}.var"], s.variance, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(two[f"{i}.gram"], next(iter(st.grams.values())).hessian(), rtol=1e-6, atol=1e-9)
    # the output Fisher of the fisher allocation too: every process must price removals alike
    from llmprune.calibration.fisher import output_fisher

    for i, per_layer in enumerate(output_fisher(model, get_adapter(model), list(ids.split(2)), labels="data")):
        for j, f in enumerate(per_layer.values()):
            torch.testing.assert_close(two[f"{i}.{j}.fisher"], f, rtol=1e-6, atol=1e-12)


def test_two_process_recover_and_prune_cli(tmp_path, ref_model_path, shared_dir):
    calib = str(shared_dir / "data" / "reference-train.txt")
    pruned = tmp_path / "pruned"
    proc = _launch(["-m", "llmprune", "prune", str(ref_model_path), "--ffn", "0.5", "--method", "wanda",
                    "--calib", calib, "--n-samples", "4", "--seq-len", "64", "--out", str(pruned), "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((pruned / "llmprune_recipe.json").read_text())["config"]["ffn"] == 0.5
    out = tmp_path / "rec"
    proc = _launch(["-m", "llmprune", "recover", str(pruned), "--data", calib, "--steps", "3", "--batch-size", "2",
                    "--seq-len", "64", "--eval-every", "3", "--eval-windows", "4", "--out", str(out), "--quiet"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = json.loads((out / "llmprune_recipe.json").read_text())
    assert recipe["training_tokens"] == 3 * 2 * 64 * 2  # both processes trained on their own windows
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".rec")] == []

