"""FLAP bias compensation: pruned + compensated == original with removed inputs replaced by their means."""

from __future__ import annotations

import copy

import pytest
import torch

from llmprune import PruneConfig
from llmprune import prune
from llmprune.arch import get_adapter
from llmprune.calibration.calibrate import layerwise_statistics
from llmprune.checkpoint.io import save_pruned

from tiny_models import assert_reloads_identically, tiny_causal_lm


def _mean_filled(model, plan, stats):
    """Hooks replacing each removed head/neuron input of o_proj/down_proj by its calibration mean."""
    adapter = get_adapter(model)
    handles = []
    for i, (layer, lp) in enumerate(zip(adapter.decoder_layers(model), plan.layers)):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        for spec_slot, kept, n in ((attn.output, lp.kept_heads, attn.num_heads),
                                   (ffn.output, lp.kept_neurons, ffn.num_neurons)):
            removed = [u for u in range(n) if kept is not None and u not in set(kept)]
            if not removed:
                continue
            idx = spec_slot.indices(removed)
            mean = stats[i].inputs[spec_slot.module].mean.index_select(0, idx).float()

            def fill(module, args, idx=idx, mean=mean):
                x = args[0].clone()
                x[..., idx] = mean.to(x.dtype)
                return (x,) + tuple(args[1:])
            handles.append(spec_slot.module.register_forward_pre_hook(fill))
    return handles


@pytest.mark.parametrize("method", ["flap", "magnitude"])
def test_compensated_equals_mean_filled(method, tmp_path):
    model = tiny_causal_lm("llama")
    original = copy.deepcopy(model)
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = PruneConfig(heads=0.5, ffn=0.25, method=method, bias_compensation=True, allocation="global")
    result = prune(model, cfg, calibration=calib, progress=False)
    # the same statistics the pruner saw (deterministic), from the untouched copy
    stats = layerwise_statistics(original, get_adapter(original), list(calib.split(8)), progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    handles = _mean_filled(original, result.plan, stats)
    with torch.no_grad():
        expected = original(ids).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(original(ids).logits, expected)  # compensation did something
    assert model.config.attention_bias and model.config.mlp_bias
    out = tmp_path / "m"
    save_pruned(model, out, config=cfg, plan=result.plan)
    assert_reloads_identically(model, out, ids)


def test_compensation_refused_where_config_cannot_declare_bias():
    model = tiny_causal_lm("mistral")
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot declare"):
        prune(model, PruneConfig(ffn=0.25, method="flap", bias_compensation=True), calibration=calib, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed


def test_flap_needs_calibration():
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(tiny_causal_lm("llama"), PruneConfig(ffn=0.25, method="flap"))
