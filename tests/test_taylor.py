"""First-order Taylor criterion: equals a plain full-backward reference, ranks a disconnected unit last, frees
every gradient as it goes, and prunes end to end (with and without reconstruction)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmprune import PruneConfig, get_adapter, prune
from llmprune.arch.base import _is_conv1d
from llmprune.structured.criteria import get_criterion
from llmprune.calibration.gradients import taylor_statistics

from tiny_models import tiny_causal_lm

BATCHES = list(torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0)).split(2))


def _reference_unit_scores(model, layer_index):
    """Σ_b |W ⊙ G_b| from ordinary backward passes that keep every gradient, summed per FFN neuron."""
    adapter = get_adapter(model)
    ffn = adapter.ffn(adapter.decoder_layers(model)[layer_index])
    total = torch.zeros(ffn.num_neurons, dtype=torch.float64)
    for ids in BATCHES:
        model.zero_grad()
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        for slot in ffn.slots:
            w = slot.module.weight
            imp = (w.detach() * w.grad).abs().double()
            if _is_conv1d(slot.module):  # GPT-2 stores [in, out]
                imp = imp.t()
            idx = slot.indices(torch.arange(ffn.num_neurons))
            rows = imp if slot.dim == "out" else imp.t()
            total += rows.index_select(0, idx).reshape(ffn.num_neurons, -1).sum(1)
    model.zero_grad()
    return total


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_taylor_equals_the_full_backward_reference(model_type):
    model = tiny_causal_lm(model_type)
    adapter = get_adapter(model)
    stats = taylor_statistics(model, adapter, BATCHES)
    layer = adapter.decoder_layers(model)[1]
    ffn = adapter.ffn(layer)
    got = get_criterion("taylor").fn(ffn.slots, ffn.num_neurons, stats[1].inputs)
    torch.testing.assert_close(got.double(), _reference_unit_scores(model, 1), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # nothing kept
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_disconnected_units_rank_last():
    model = tiny_causal_lm("llama")
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, 5] = 0  # neuron 5 reaches nothing
        layer.self_attn.o_proj.weight[:, 16:32] = 0  # query head 1 reaches nothing
    stats = taylor_statistics(model, adapter, BATCHES)
    crit = get_criterion("taylor")
    ffn, attn = adapter.ffn(layer), adapter.attention(layer)
    neurons = crit.fn(ffn.slots, ffn.num_neurons, stats[0].inputs)
    heads = crit.fn(attn.q_slots, attn.num_heads, stats[0].inputs)
    assert neurons[5] == 0 and int(neurons.argmin()) == 5
    assert int(heads.argmin()) == 1


@pytest.mark.parametrize("reconstruct", [False, True])
def test_prune_with_taylor(reconstruct):
    model = tiny_causal_lm("qwen3")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    result = prune(model, PruneConfig(heads=0.5, ffn=0.25, method="taylor", reconstruct=reconstruct),
                   calibration=ids, progress=False)
    assert model.config.num_attention_heads == 2 and result.params_after < result.params_before
    with pytest.raises(ValueError, match="calibration"):
        prune(tiny_causal_lm("qwen3"), PruneConfig(ffn=0.25, method="taylor"), progress=False)
