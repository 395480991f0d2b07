"""compressed-tensors sparse checkpoints (issue 21): refused by load_model with one clear line, because the
installed stack (transformers 5.x, compressed-tensors >= 0.15) would load their sparse layers as random weights.

The checkpoints are written here by hand in the legacy layout (``<w>.bitmask`` / ``.compressed`` / ``.shape`` /
``.row_offsets`` and ``quantization_config.sparsity_config``); nothing in the installed stack can write them.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from llmprune.checkpoint.compressed_tensors import SPARSE_FORMATS, sparse_compression_format
from llmprune.checkpoint.io import CheckpointError, load_model
from tiny_models import tiny_causal_lm

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None


def _legacy_checkpoint(folder, fmt="sparse-bitmask", tied=True, dtype=torch.float32, with_config=True):
    """A tiny llama saved, then its decoder Linear weights rewritten in compressed-tensors' legacy sparse layout."""
    model = tiny_causal_lm("llama", tie_word_embeddings=tied).to(dtype)
    model.save_pretrained(folder)
    sd = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        t = t.contiguous()
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            out, inp = t.shape
            sd[name + ".shape"] = torch.tensor([out, inp], dtype=torch.int32)
            sd[name + ".bitmask"] = torch.full((out, (inp + 7) // 8), 0x55, dtype=torch.uint8)
            sd[name + ".compressed"] = t[:, ::2].contiguous() if fmt == "sparse-24-bitmask" else t[:, ::2].flatten().contiguous()
            if fmt == "sparse-bitmask":
                sd[name + ".row_offsets"] = torch.arange(out, dtype=torch.int64) * (inp // 2)
        else:
            sd[name] = t
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if with_config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "sparsity_config": {"format": fmt, "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": 0.5,
                                "sparsity_structure": "2:4" if fmt == "sparse-24-bitmask" else "unstructured"}}
        (folder / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
@pytest.mark.parametrize("tied,dtype", [(True, torch.float32), (False, torch.bfloat16)], ids=["tied-fp32", "untied-bf16"])
def test_load_model_refuses_sparse_compressed(tmp_path, fmt, tied, dtype):
    _legacy_checkpoint(tmp_path, fmt, tied, dtype)
    with pytest.raises(CheckpointError, match=f"compressed-tensors '{fmt}'") as err:
        load_model(tmp_path, with_tokenizer=False)
    assert "\n" not in str(err.value) and "random weights" in str(err.value)


def test_bitmask_tensors_refused_without_sparsity_config(tmp_path):
    _legacy_checkpoint(tmp_path, with_config=False)
    with pytest.raises(CheckpointError, match="sparse-bitmask"):
        load_model(tmp_path, with_tokenizer=False)


def test_truncated_sparse_checkpoint_is_a_clear_error(tmp_path):
    _legacy_checkpoint(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model(tmp_path, with_tokenizer=False)
    assert "\n" not in str(err.value)


def test_dense_and_quantized_configs_are_not_sparse(tmp_path):
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path)
    assert sparse_compression_format(tmp_path) is None
    load_model(tmp_path, with_tokenizer=False)  # a plain (sparsified-with-zeros) checkpoint loads
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized", "sparsity_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert sparse_compression_format(tmp_path) is None
    assert "marlin-24" in SPARSE_FORMATS


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors not installed")
def test_upstream_still_cannot_read_sparse_formats(tmp_path):
    """Why llmprune writes no compressed-tensors sparse output (README, "Sparse checkpoint formats"). If this
    fails, compressed-tensors / transformers read sparse formats again: revisit issue 21."""
    from compressed_tensors.compressors import BaseCompressor
    from transformers import AutoModelForCausalLM

    for fmt in ("sparse-bitmask", "sparse-24-bitmask"):
        with pytest.raises(KeyError):
            BaseCompressor.get_value_from_registry(fmt)
    _legacy_checkpoint(tmp_path)
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert "model.layers.0.mlp.down_proj.weight" in info["missing_keys"]  # initialised at random, no error
