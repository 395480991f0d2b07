"""Mixture-of-experts families (Qwen3-MoE, Mixtral): heads, KV groups, expert neurons, whole experts and
layers. Pruned == masked original (see masking.py for the expert reference), save -> from_pretrained
round trip, uniform and per-layer allocation, greedy generation with KV cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import llmprune  # noqa: F401  (registers per-layer classes)
from llmprune import PruneConfig
from llmprune import RatioError, prune
from llmprune.core.config import LayerPlan, PrunePlan
from llmprune.checkpoint.io import read_plan, save_pruned
from llmprune.structured.apply import apply_plan
from llmprune.arch.surgery import layer_widths, widths_by_kind

from masking import mask_model
from tiny_models import MOE_CONFIGS, assert_reloads_identically, tiny_moe

ATOL = 2e-5


def _ids(batch=2, seq=12, seed=1):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_equivalent(original, pruned, plan):
    ids = _ids()
    handles = mask_model(original, plan)
    try:
        with torch.no_grad():
            torch.testing.assert_close(pruned(ids).logits, original(ids).logits, atol=ATOL, rtol=1e-4)
            kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            assert torch.equal(pruned.generate(ids[:1, :6], **kw), original.generate(ids[:1, :6], **kw))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_type", list(MOE_CONFIGS))
@pytest.mark.parametrize("cfg", [
    PruneConfig(heads=0.5, ffn=0.25, experts=0.25, method="magnitude"),
    PruneConfig(heads=0.5, ffn=0.25, experts=0.5, layers=1, method="wanda", allocation="global",
                attention_unit="query", min_keep=0.2),
], ids=["uniform-magnitude", "global-wanda-layer"])
def test_pruned_equals_masked(model_type, cfg):
    model = tiny_moe(model_type)
    original = copy.deepcopy(model)
    result = prune(model, cfg, calibration=_ids(8, 16, seed=3), progress=False)
    assert result.params_after < result.params_before
    kept = [lp for i, lp in enumerate(result.plan.layers) if lp.kept_experts is not None]
    assert kept and all(len(lp.kept_experts) == 8 - round(8 * cfg.experts) for lp in kept)
    # each expert keeps its own neurons: the sets differ between experts
    lp = kept[0]
    assert len({tuple(k) for k in lp.kept_expert_neurons}) > 1
    _assert_equivalent(original, model, result.plan)


@pytest.mark.parametrize("model_type", list(MOE_CONFIGS))
def test_fewer_experts_than_top_k(model_type):
    """Keeping one expert with top-k=2: top_k drops to 1, exactly like the -inf-masked router."""
    model = tiny_moe(model_type)
    original = copy.deepcopy(model)
    layers = []
    for i in range(3):
        moe = llmprune.arch.get_adapter(model).experts(model.model.layers[i])
        layers.append(LayerPlan(kept_experts=[5], kept_expert_neurons=[sorted((e + 2 * j) % 32 for j in range(16)) for e in range(8)])
                      if moe is not None else LayerPlan(kept_neurons=list(range(0, 96, 3))))
    plan = PrunePlan(layers=layers, removed_layers=[])
    apply_plan(model, plan)
    assert model.config.num_experts_per_tok == 1
    assert all(layer.mlp.gate.top_k == 1 for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    _assert_equivalent(original, model, plan)


@pytest.mark.parametrize("model_type", list(MOE_CONFIGS))
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_save_reload_identical(tmp_path, model_type, allocation):
    model = tiny_moe(model_type)
    cfg = PruneConfig(heads=0.5, ffn=0.25, experts=0.25, method="magnitude", allocation=allocation,
                      layers=1 if allocation == "global" else 0)
    result = prune(model, cfg, calibration=_ids(8, 16, seed=3), progress=False)
    out = tmp_path / "pruned"
    save_pruned(model, out, config=cfg, plan=result.plan, source="tiny")
    reloaded = assert_reloads_identically(model, out, _ids())
    saved = json.loads((out / "config.json").read_text())
    experts_key = "num_local_experts"  # Qwen3-MoE maps num_experts to it
    assert saved[experts_key] == 6
    if allocation == "uniform":
        assert saved["model_type"] == model_type
    else:
        assert layer_widths(reloaded) == layer_widths(model)
    by_kind = widths_by_kind(reloaded, ("heads", "neurons", "experts"))
    assert by_kind == {k: [w[k] for w in layer_widths(model)] for k in ("heads", "neurons", "experts")}
    assert read_plan(out) == result.plan


def test_expert_scores_use_routing_mass_with_calibration():
    from llmprune.structured.score import score_layers
    from llmprune.arch import get_adapter
    from llmprune.calibration.calibrate import layerwise_statistics

    model = tiny_moe("mixtral")
    adapter = get_adapter(model)
    stats = layerwise_statistics(model, adapter, [_ids(4, 16)], progress=False)
    mass = stats[0].extra["router_mass"]
    # every token hands out total weight 1 over its top-k (Mixtral renormalises)
    assert mass.sum().item() == pytest.approx(stats[0].extra["router_tokens"], rel=1e-5)
    s = score_layers(model, adapter, PruneConfig(experts=0.25, method="magnitude"), stats)
    assert torch.allclose(s[0].experts, mass / stats[0].extra["router_tokens"])
    no_data = score_layers(model, adapter, PruneConfig(experts=0.25, method="magnitude"), None)
    assert no_data[0].experts.shape == (8,) and (no_data[0].experts > 0).all()


def test_bad_expert_ratios():
    with pytest.raises(ValueError, match="range"):
        PruneConfig(experts=1.0)
    with pytest.raises(RatioError, match="every expert"):
        prune(tiny_moe("mixtral"), PruneConfig(experts=0.99, method="magnitude"), progress=False)
    from tiny_models import tiny_causal_lm

    with pytest.raises(RatioError, match="no mixture-of-experts"):
        prune(tiny_causal_lm("llama"), PruneConfig(experts=0.25, method="magnitude"), progress=False)


def test_old_plan_json_still_loads():
    plan = PrunePlan.from_dict({"layers": [{"kept_heads": [0], "kept_kv_heads": [0], "kept_neurons": None}],
                                "removed_layers": []})
    assert plan.layers[0].kept_experts is None and PrunePlan.from_json(plan.to_json()) == plan
