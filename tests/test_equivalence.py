"""Core invariant: physically pruned model == original with the same units masked (fp32 tolerance)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from llmprune import PruneConfig
from llmprune import prune
from llmprune.arch import get_adapter
from llmprune.core.config import LayerPlan, PrunePlan
from llmprune import RatioError
from llmprune.structured.apply import apply_plan

from masking import mask_model
from tiny_models import CAUSAL_LM_TYPES, LIGHT_VARIANTS, tiny_causal_lm

ATOL = 2e-5


def _inputs(vocab: int, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _assert_equivalent(original, pruned, plan, vocab):
    ids = _inputs(vocab)
    handles = mask_model(original, plan)
    try:
        with torch.no_grad():
            ref = original(ids).logits
            got = pruned(ids).logits
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)
        # Generation with KV cache gives the same greedy tokens as the masked original.
        prompt = ids[:1, :6]
        gen_kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            assert torch.equal(pruned.generate(prompt, **gen_kw), original.generate(prompt, **gen_kw))
    finally:
        for h in handles:
            h.remove()


_CFGS = {
    "uniform-group-magnitude": PruneConfig(heads=0.5, ffn=0.25, method="magnitude"),
    "global-query-magnitude": PruneConfig(heads=0.5, ffn=0.3, method="magnitude", attention_unit="query",
                                          allocation="global"),
    "global-group-wanda-layer": PruneConfig(heads=0.5, ffn=0.5, method="wanda", layers=1, allocation="global",
                                            min_keep=0.2),
}
_CASES = [pytest.param(t, cfg, id=f"{name}-{t}") for name, cfg in _CFGS.items() for t in CAUSAL_LM_TYPES
          if t not in LIGHT_VARIANTS or name == "global-group-wanda-layer"]


@pytest.mark.parametrize("model_type,cfg", _CASES)
def test_pruned_equals_masked(model_type, cfg):
    model = tiny_causal_lm(model_type)
    original = copy.deepcopy(model)
    calib = _inputs(model.config.vocab_size, batch=8, seq=16, seed=3)
    adapter = get_adapter(model)
    if adapter.attention(adapter.decoder_layers(model)[0]).num_kv_heads == 1 and cfg.attention_unit == "group":
        # Multi-query attention: the single KV group cannot be removed; prune query heads instead.
        with pytest.raises(RatioError):
            prune(copy.deepcopy(model), cfg, calibration=calib, progress=False)
        cfg = dataclasses.replace(cfg, attention_unit="query")
    result = prune(model, cfg, calibration=calib, progress=False)
    assert result.params_after < result.params_before
    _assert_equivalent(original, model, result.plan, model.config.vocab_size)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3", "falcon:new"])
def test_hand_written_plan_with_uneven_layers(model_type):
    """Arbitrary kept sets (not from a criterion), different per layer, plus a removed layer."""
    model = tiny_causal_lm(model_type)
    original = copy.deepcopy(model)
    plan = PrunePlan(
        layers=[
            LayerPlan(kept_heads=[2, 3], kept_kv_heads=[1], kept_neurons=list(range(0, 96, 3))),
            LayerPlan(kept_heads=[0, 3], kept_kv_heads=[0, 1], kept_neurons=[5, 6, 90]),
            LayerPlan(kept_neurons=list(range(50))),
        ],
        removed_layers=[1],
    )
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == 2
    for j, layer in enumerate(get_adapter(model).decoder_layers(model)):
        assert {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")} == {j}
    _assert_equivalent(original, model, plan, model.config.vocab_size)


def test_reference_model_equivalence(ref_model, shared_dir):
    model, tok = ref_model
    original = copy.deepcopy(model)
    cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda", n_samples=4, seq_len=64)
    result = prune(model, cfg, tokenizer=tok, calibration=shared_dir / "data" / "reference-train.txt", progress=False)
    assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 3
    assert model.config.intermediate_size == 576
    _assert_equivalent(original, model, result.plan, model.config.vocab_size)
