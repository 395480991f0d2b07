"""Save -> from_pretrained gives identical logits, for uniform and per-layer pruning; recipe round-trips."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune import PruneConfig
from llmprune import prune
from llmprune.core.config import PrunePlan
from llmprune.checkpoint.io import read_plan, read_recipe, save_pruned

from tiny_models import assert_reloads_identically, base_type, tiny_causal_lm


def _ids(vocab):
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "phi3", "gpt2", "opt", "gpt_neox", "falcon:new"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_save_reload_identical(tmp_path, model_type, allocation):
    model = tiny_causal_lm(model_type)
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="magnitude", allocation=allocation, attention_unit="query")
    result = prune(model, cfg, progress=False)
    out = tmp_path / "pruned"
    save_pruned(model, out, config=cfg, plan=result.plan, source="tiny")
    assert_reloads_identically(model, out, _ids(model.config.vocab_size))
    saved = json.loads((out / "config.json").read_text())
    model_type = base_type(model_type)
    if allocation == "uniform" and model_type in _HEAD_DIM_FROM_HIDDEN:
        assert saved["model_type"] == "llmprune_" + model_type  # a standard config would rebuild wrong shapes
    if allocation == "uniform" and saved["model_type"] == model_type:
        assert "llmprune_layer_widths" not in saved or saved["llmprune_layer_widths"] is None
    if allocation == "global":
        assert saved["model_type"] == "llmprune_" + model_type
        assert len(saved["llmprune_layer_widths"]) == model.config.num_hidden_layers
    assert PruneConfig.from_dict(read_recipe(out)["config"]) == cfg
    assert read_plan(out) == result.plan
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert "library_name: transformers" in (out / "README.md").read_text()


#: families whose modules derive head_dim = hidden_size // num_heads from the config
_HEAD_DIM_FROM_HIDDEN = ("gpt2", "opt", "gpt_neox", "falcon")


@pytest.mark.parametrize("model_type", _HEAD_DIM_FROM_HIDDEN)
def test_ffn_only_stays_standard_checkpoint(tmp_path, model_type):
    """Without head pruning these families keep a plain checkpoint (uniform FFN width in the standard field)."""
    model = tiny_causal_lm(model_type)
    prune(model, PruneConfig(heads=0.0, ffn=0.25, method="magnitude"), progress=False)
    out = tmp_path / "m"
    save_pruned(model, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    assert_reloads_identically(model, out, _ids(model.config.vocab_size))


def test_uniform_standard_config_loads_without_llmprune(tmp_path):
    """A uniform result whose config validates stays a plain 'qwen2' checkpoint: loads in a fresh process."""
    import subprocess
    import sys

    model = tiny_causal_lm("qwen2")
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="magnitude")
    result = prune(model, cfg, progress=False)
    out = tmp_path / "m"
    save_pruned(model, out, config=cfg, plan=result.plan)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    ids = _ids(128)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval();"
        "assert 'llmprune' not in sys.modules;"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True);"
        f"torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=1e-6, rtol=0)


def test_reference_model_roundtrip(tmp_path, ref_model, shared_dir):
    model, tok = ref_model
    cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda", n_samples=4, seq_len=64)
    result = prune(model, cfg, tokenizer=tok, calibration=shared_dir / "data" / "reference-train.txt", progress=False)
    out = tmp_path / "ref"
    save_pruned(model, out, tokenizer=tok, config=cfg, plan=result.plan)
    reloaded, tok2 = llmprune.checkpoint.io.load_model(out)
    ids = tok("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert tok2("abc").input_ids == tok("abc").input_ids


def test_config_and_plan_json_roundtrip():
    cfg = PruneConfig(heads=0.25, ffn=0.5, layers=1, method="magnitude", allocation="global", multiple_of=8)
    assert PruneConfig.from_json(cfg.to_json()) == cfg
    plan = PrunePlan.from_dict({"layers": [{"kept_heads": [0, 1], "kept_kv_heads": [0], "kept_neurons": None}],
                                "removed_layers": []})
    assert PrunePlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="unknown PruneConfig field"):
        PruneConfig.from_dict({"heads": 0.1, "typo": 1})


def test_every_load_turns_hub_kernels_off(tmp_path, monkeypatch):
    """transformers >= 5.25 kernelizes by default when ``kernels`` is installed (Hub downloads, other numerics,
    and no meta-device skeleton): the verified save and ``load_model`` both pass ``use_kernels=False``."""
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model = tiny_causal_lm("llama")
    prune(model, PruneConfig(heads=0.25, ffn=0.25, method="magnitude"), progress=False)
    out = save_pruned(model, tmp_path / "m")  # verify: a meta-device skeleton, then a full reload
    llmprune.load_model(out, with_tokenizer=False)
    assert len(seen) >= 3 and all(v is False for v in seen), seen
