"""Single-unit performance: the cluster analysis on known matrices, constructed units whose answer is known,
the batched per-unit matrices against a direct per-unit computation, and pruning end to end."""

from __future__ import annotations

import pytest
import torch

from llmprune import PruneConfig, get_adapter, prune
from llmprune.structured.criteria import get_criterion
from llmprune.calibration.single_unit import cluster_analysis, single_unit_statistics, unit_scores

from tiny_models import tiny_causal_lm


def test_cluster_analysis_on_known_matrices():
    K = 6
    cluster = torch.full((K, K), 0.05)
    cluster[:3, :3] = 1.0  # labels 0-2 predicted together: one cluster of 3, no noise
    noisy = cluster.clone()
    noisy[4, 0] = 0.8  # a surviving entry outside any cluster
    nothing = torch.full((K, K), 0.05)
    nothing[0, 5] = 1.0  # predicts label 5 for true label 0: no diagonal survives
    signal, snr, n = cluster_analysis(torch.stack([cluster, noisy, nothing]))
    assert n.tolist() == [3, 3, 0]
    assert signal[0] == pytest.approx(9.0) and torch.isinf(snr[0])
    assert snr[1] == pytest.approx(9.0 / 0.8)
    assert signal[2] == 0
    scores = unit_scores(torch.stack([cluster, noisy, nothing, torch.zeros(K, K)]))
    assert scores[0] > scores[1] > scores[2] == scores[3] == 0


def test_unit_predicting_a_cluster_outranks_a_silent_one():
    """Neuron 0 of layer 0 writes the LM-head direction of the most frequent label and fires exactly when it is
    the target; neuron 1 writes nothing. Neuron 0 must rank above neuron 1, which ranks last."""
    model = tiny_causal_lm("llama")
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 1::2] = 2  # token 2 is the most frequent target
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, 0] = head[2] * 5
        layer.mlp.down_proj.weight[:, 1] = 0
    ffn = adapter.ffn(layer)

    def fire(module, args):  # neuron 0's input is large exactly at positions whose target is token 2
        x = args[0].clone()
        nxt = torch.nn.functional.pad(ids[:, 1:] == 2, (0, 1)).to(x.dtype)
        x[..., 0] = 10 * nxt
        return (x,)

    h = layer.mlp.down_proj.register_forward_pre_hook(fire)
    try:
        stats = single_unit_statistics(model, adapter, [ids], {0: [layer.mlp.down_proj]}, top_k=8)
    finally:
        h.remove()
    scores = get_criterion("single-unit").fn(ffn.slots, ffn.num_neurons, stats[0].inputs)
    assert scores[0] > 0 and scores[1] == 0 == scores.min()  # the silent neuron is among the first removed


def test_batched_matrices_equal_a_direct_solo_readout():
    model = tiny_causal_lm("qwen3")
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[1]
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    captured = []
    h = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    stats = single_unit_statistics(model, adapter, [ids], {1: [layer.mlp.down_proj]}, top_k=5)
    h.remove()
    s = stats[1].inputs[layer.mlp.down_proj]
    x = captured[0][:, :-1].reshape(-1, captured[0].shape[-1]).double()
    targets = ids[:, 1:].reshape(-1)
    labels = torch.bincount(targets).argsort(descending=True)[:5]
    n = 7  # neuron 7 alone: its solo residual contribution, read out through norm gain / mean rms and LM head
    solo = x[:, n : n + 1] * layer.mlp.down_proj.weight[:, n].double().reshape(1, -1)
    logits = (solo * model.model.norm.weight.double()) @ model.lm_head.weight.double()[labels].t()
    ratios = []
    for y, label in enumerate(labels.tolist()):
        expected = logits[targets == label].mean(0)  # [K]: mean solo logit of each label, true label y
        got = (s.label_sums[n, y] / s.label_counts[y]) * s.readout[:, n]
        ratios.append(expected / got)
    ratios = torch.cat(ratios)
    # equal up to one common factor: the final norm's mean RMS, which the statistics divide by
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_prune_with_single_unit(model_type):
    model = tiny_causal_lm(model_type)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    result = prune(model, PruneConfig(heads=0.5, ffn=0.25, method="single-unit"), calibration=ids, progress=False)
    assert result.params_after < result.params_before
