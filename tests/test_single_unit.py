"""Single-unit performance: the cluster analysis on known matrices, constructed units whose answer is known,
the batched per-unit matrices against a direct per-unit computation, and pruning end to end. The scores of
``single_unit_score`` each against a reference written here: ``snr`` against the authors' counting, ``solo-loss``
against each unit's write read out directly, ``solo-loss-refit``'s residual against an explicit ridge regression."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


# ---- the formulations of single_unit_score, each against a reference written here -------------------------------

def _seed_snr(M: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """The authors' counting (Shutshutnunte/AFCC, Compute_Matrices_Clusters.py), re-written: binarise the
    max-normalised matrix, group the labels whose diagonal survives in label order into squares of ones, then
    signal = entries inside squares, noise = the other ones."""
    out = []
    for m in M.double():
        ones = (m / m.max() >= threshold).int()
        labels = [j for j in range(m.shape[0]) if ones[j, j]]
        left, clusters = list(labels), []
        for lb in labels:
            if lb in left:
                cluster = [lb]
                for lb2 in left[1:]:
                    idx = torch.tensor(cluster + [lb2])
                    if int(ones[idx][:, idx].sum()) == len(idx) ** 2:
                        cluster.append(lb2)
                for c in cluster:
                    left.remove(c)
                clusters.append(cluster)
        signal = sum(len(c) ** 2 for c in clusters)
        noise = int(ones.sum()) - signal
        out.append(0.0 if signal == 0 else signal / max(noise, 0.5))
    return torch.tensor(out, dtype=torch.float64)


def test_snr_scores_match_the_seeds_counting():
    from llmprune.calibration.single_unit import SNR_NOISE_FLOOR, snr_scores

    g = torch.Generator().manual_seed(3)
    K, mats = 12, []
    for u in range(40):  # planted clusters (disjoint label blocks), background below the threshold, one-way noise
        m = torch.rand(K, K, generator=g) * 0.2
        perm = torch.randperm(K, generator=g)
        sizes = [int(s) for s in torch.randint(1, 4, (3,), generator=g)]
        start = 0
        if u % 5 == 0:  # no cluster: the largest entry is off the diagonal, every diagonal entry below threshold
            m[0, 1] = 1.0
        for size in sizes[: u % 4 if u % 5 else 0]:
            block = perm[start : start + size]
            m[block.reshape(-1, 1), block.reshape(1, -1)] = 0.5 + 0.5 * torch.rand(size, size, generator=g)
            start += size
        for _ in range(u % 3):  # above the threshold in one direction only: noise, never a cluster member
            i, j = (int(v) for v in torch.randint(0, K, (2,), generator=g))
            if i != j and m[j, i] < 0.3:
                m[i, j] = 0.9
        mats.append(m)
    M = torch.stack(mats)
    expected = _seed_snr(M)
    assert torch.allclose(snr_scores(M).double(), expected, rtol=1e-6)
    assert (expected == 0).any() and (expected > 0).any()
    clean = torch.full((K, K), 0.05)
    clean[:2, :2] = 1.0  # one cluster of 2, no noise: 4 entries over the floor
    assert snr_scores(clean[None])[0] == pytest.approx(4 / SNR_NOISE_FLOOR)


def _capture(modules):
    seen = {}

    def record(module, args):
        seen.setdefault(module, args[0].detach().double())

    return seen, [m.register_forward_pre_hook(record) for m in modules]


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_solo_loss_equals_a_direct_solo_readout_of_each_unit(model_type):
    """The solo-loss score of a neuron and of a head against the loss computed here from the unit's write alone:
    through the final norm at each position's own RMS (Gemma: gain 1 + w) and the LM head rows of the labels."""
    model = tiny_causal_lm(model_type)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[1]
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    criterion = get_criterion("single-unit")
    down, o_proj = layer.mlp.down_proj, layer.self_attn.o_proj
    norm = model.model.norm
    seen, handles = _capture([down, o_proj, norm])
    stats = criterion.prepare(model, adapter, [ids], False, single_unit_score="solo-loss", percdamp=0.01)
    for h in handles:
        h.remove()
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    neurons = criterion.fn(ffn.slots, ffn.num_neurons, stats[1].inputs, single_unit_score="solo-loss")
    heads = criterion.fn(attn.q_slots, attn.num_heads, stats[1].inputs, single_unit_score="solo-loss")

    K = 64
    targets = ids[:, 1:].reshape(-1)
    labels = torch.bincount(targets).argsort(descending=True)[:K]
    K = labels.numel()
    keep = torch.isin(targets, labels)
    label_idx = torch.tensor([int((labels == t).nonzero()) for t in targets[keep]])
    h = seen[norm][:, :-1].reshape(-1, seen[norm].shape[-1])[keep]
    rms = (h.pow(2).mean(-1) + model.config.rms_norm_eps).sqrt()
    gain = norm.weight.double() + (1 if model_type == "gemma2" else 0)
    head = model.lm_head.weight.double()[labels]

    def reference(write):  # write: [T, hidden], the unit's contribution at each labelled position
        logits = (write / rms.reshape(-1, 1) * gain) @ head.t()
        ce = torch.logsumexp(logits, 1) - logits[torch.arange(len(label_idx)), label_idx]
        return float((math.log(K) - ce).mean().detach())

    x = seen[down][:, :-1].reshape(-1, seen[down].shape[-1])[keep]
    for n in (0, 7, 50):
        write = x[:, n : n + 1] * down.weight.double()[:, n].reshape(1, -1)
        assert neurons[n].item() == pytest.approx(reference(write), rel=1e-6, abs=1e-12)
    x = seen[o_proj][:, :-1].reshape(-1, seen[o_proj].shape[-1])[keep]
    d = attn.head_dim
    for hd in range(attn.num_heads):
        write = x[:, hd * d : (hd + 1) * d] @ o_proj.weight.double()[:, hd * d : (hd + 1) * d].t()
        assert heads[hd].item() == pytest.approx(reference(write), rel=1e-6, abs=1e-12)
    assert neurons.abs().max() > 0


def test_solo_loss_gain_is_exact_for_small_and_large_logits():
    """The float32 log1p/expm1 form against float64 cross-entropy, per unit, with one unit writing logits far
    beyond the small-logit range (its chunk takes the logsumexp form)."""
    from llmprune.calibration.single_unit import solo_loss_gain

    g = torch.Generator().manual_seed(8)
    T, d, K = 200, 12, 7
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    readout = torch.randn(K, d, generator=g, dtype=torch.float64) * 0.01
    inv_rms = torch.rand(T, generator=g, dtype=torch.float64) + 0.5
    labels = torch.randint(0, K, (T,), generator=g)
    for units in (torch.arange(d).reshape(-1, 1), torch.arange(d).reshape(3, 4)):
        for scale in (1.0, 1e4):
            r = readout.clone()
            r[:, 0] *= scale
            got = solo_loss_gain(x, labels, r, units, inv_rms)
            for u, cols in enumerate(units.tolist()):
                z = (x[:, cols] @ r[:, cols].t()) * inv_rms.reshape(-1, 1)
                expected = float((math.log(K) - F.cross_entropy(z, labels, reduction="none")).sum())
                assert got[u].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_refit_residual_is_the_ridge_residual_on_the_other_features():
    from llmprune.calibration.single_unit import refit_residual

    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    H, lam = x.t() @ x, 0.3
    P = torch.linalg.inv(H + lam * torch.eye(12, dtype=torch.float64))
    for units in (torch.arange(12).reshape(3, 4), torch.arange(12).reshape(12, 1),
                  torch.tensor([[0, 5], [1, 7], [2, 3], [4, 6], [8, 11], [9, 10]])):
        got = refit_residual(x, P, units)
        for U in units.tolist():
            rest = [j for j in range(12) if j not in U]
            B = torch.linalg.solve(H[rest][:, rest] + lam * torch.eye(len(rest), dtype=torch.float64), H[rest][:, U])
            expected = x[:, U] - x[:, rest] @ B
            assert torch.allclose(got[:, U], expected, rtol=1e-8, atol=1e-10)


def test_solo_loss_refit_scores_a_replaceable_neuron_near_zero():
    """Neuron 1 of layer 0 gets exactly neuron 0's input: the refit of the other units replaces either one, so
    both score about 0 under solo-loss-refit while solo-loss still credits them."""
    model = tiny_causal_lm("llama")
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]

    def copy_input(module, args):
        x = args[0].clone()
        x[..., 1] = x[..., 0]
        return (x,)

    handle = layer.mlp.down_proj.register_forward_pre_hook(copy_input)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(6))
    criterion, ffn = get_criterion("single-unit"), adapter.ffn(layer)
    scores = {}
    try:
        for score in ("solo-loss", "solo-loss-refit"):
            stats = criterion.prepare(model, adapter, [ids], False, single_unit_score=score, percdamp=1e-6)
            scores[score] = criterion.fn(ffn.slots, ffn.num_neurons, stats[0].inputs, single_unit_score=score)
    finally:
        handle.remove()
    plain, refit = scores["solo-loss"].abs(), scores["solo-loss-refit"].abs()
    assert plain[0] > 0 and plain[1] > 0
    assert refit[0] < 1e-3 * plain[0] and refit[1] < 1e-3 * plain[1]
    assert refit[2:].max() > 1e-3 * plain[2:].max()  # the others keep a part no refit replaces


@pytest.mark.parametrize("score", ["clusters", "snr", "solo-loss", "solo-loss-refit"])
def test_each_score_reaches_the_criterion_through_prune(score):
    from llmprune.calibration.single_unit import SCORES

    assert score in SCORES
    model = tiny_causal_lm("qwen2")
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    criterion = get_criterion("single-unit")
    stats = criterion.prepare(model, adapter, [ids], False, single_unit_score=score, percdamp=0.01)
    ffns = [adapter.ffn(layer) for layer in adapter.decoder_layers(model)]
    expected = [criterion.fn(f.slots, f.num_neurons, stats[i].inputs, single_unit_score=score)
                for i, f in enumerate(ffns)]
    result = prune(model, PruneConfig(ffn=0.25, method="single-unit", single_unit_score=score), calibration=ids,
                   progress=False)
    for lp, s in zip(result.plan.layers, expected):
        removed = set(range(s.numel())) - set(lp.kept_neurons)
        assert s[list(removed)].max() <= s[lp.kept_neurons].min()


def test_single_unit_score_is_a_config_field_and_a_cli_option():
    from llmprune.calibration.single_unit import SCORES
    from llmprune.cli import build_parser

    cfg = PruneConfig(method="single-unit", single_unit_score="snr")
    assert PruneConfig.from_json(cfg.to_json()) == cfg and PruneConfig().single_unit_score == SCORES[0] == "clusters"
    with pytest.raises(ValueError, match="single_unit_score='loss'"):
        PruneConfig(single_unit_score="loss")
    args = build_parser().parse_args(["prune", "m", "--out", "o", "--method", "single-unit",
                                      "--single-unit-score", "solo-loss-refit"])
    assert args.single_unit_score == "solo-loss-refit"
    assert get_criterion("single-unit").options == ("single_unit_score", "percdamp")
