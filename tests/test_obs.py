"""Method obs (structured optimal brain surgeon) and the fisher allocation: the greedy choice against an
independent brute-force greedy, the Fisher pass against a direct computation, every family pruned, saved and
reloaded in a fresh process, and the per-kind totals of the fisher allocation."""

from __future__ import annotations

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.arch import get_adapter
from llmprune.calibration.fisher import output_fisher
from llmprune.structured.obs import greedy_block_removal, greedy_column_removal
from llmprune.structured.reconstruct import output_error, refit_columns

from tiny_models import CAUSAL_LM_TYPES, assert_reloads_identically, tiny_causal_lm


def _problem(seed: int = 0, n_in: int = 24, n_out: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, n_in, generator=g, dtype=torch.float64) * torch.rand(n_in, generator=g, dtype=torch.float64) * 3
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    a = torch.randn(n_out, n_out, generator=g, dtype=torch.float64)
    return w, x.t() @ x, a @ a.t()


def _weighted_error(w, gram, kept, fisher, percdamp):
    """Output error after the damped refit, in the Fisher metric: tr(F D G_damped Dᵀ) with D = W - V scattered;
    computed from scratch (the reference the greedy must follow step by step)."""
    lam = percdamp * float(torch.diagonal(gram).mean())
    gd = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    new = refit_columns(w, gd, kept, percdamp=0.0)
    d = w.clone()
    d[:, kept] -= new
    return float(torch.trace(fisher @ d @ gd @ d.t()))


@pytest.mark.parametrize("use_fisher", [False, True])
def test_greedy_columns_follow_a_brute_force_greedy(use_fisher):
    w, gram, fisher = _problem()
    f = fisher if use_fisher else None
    order, cost = greedy_column_removal(w, gram, 12, f, percdamp=0.01, chunk_div=10**9)  # one column per step
    eye = fisher if use_fisher else torch.eye(w.shape[0], dtype=torch.float64)
    removed: list[int] = []
    for step in range(12):
        cands = [j for j in range(w.shape[1]) if j not in removed]
        errs = {j: _weighted_error(w, gram, [k for k in cands if k != j], eye, 0.01) for j in cands}
        best = min(errs, key=errs.get)
        assert order[step] == best
        removed.append(best)
        assert float(cost[step + 1]) == pytest.approx(errs[best], rel=1e-6)


def test_chunked_greedy_is_close_to_the_exact_one():
    w, gram, fisher = _problem(1, n_in=256, n_out=32)
    exact, _ = greedy_column_removal(w, gram, 128, fisher, chunk_div=10**9)
    chunked, cost = greedy_column_removal(w, gram, 128, fisher)
    eye = fisher
    e1 = _weighted_error(w, gram, sorted(set(range(256)) - set(exact)), eye, 0.01)
    e2 = _weighted_error(w, gram, sorted(set(range(256)) - set(chunked)), eye, 0.01)
    assert e2 <= 1.05 * e1 and float(cost[-1]) == pytest.approx(e2, rel=1e-6)


def test_greedy_blocks_one_per_group():
    w, gram, _ = _problem(2, n_in=24)
    blocks = [torch.arange(h * 4, h * 4 + 4) for h in range(6)]  # 6 heads of 4 columns, 2 groups of 3
    steps, cost = greedy_block_removal(w, gram, blocks, 2, groups=[[0, 1, 2], [3, 4, 5]])
    assert all(len(s) == 2 and s[0] in (0, 1, 2) and s[1] in (3, 4, 5) for s in steps)
    assert len({b for s in steps for b in s}) == 4 and torch.all(cost[1:] >= cost[:-1])


def test_fisher_diagonal_is_the_diagonal_of_the_full_fisher():
    model = tiny_causal_lm("llama").eval()
    adapter = get_adapter(model)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))]
    full = output_fisher(model, adapter, batches, labels="data")
    diag = output_fisher(model, adapter, batches, diagonal=True, labels="data")
    assert all(p.requires_grad for p in model.parameters())  # left as it was
    for fl, dl in zip(full, diag):
        for m in fl:
            torch.testing.assert_close(torch.diagonal(fl[m]), dl[m])
    # against a direct computation: the gradient of the summed loss w.r.t. o_proj's output
    o = adapter.attention(adapter.decoder_layers(model)[1]).output.module
    seen = {}
    def keep(m, a, out):
        out.retain_grad()
        seen["y"] = out

    h = o.register_forward_hook(keep)
    logits = model(batches[0]).logits
    h.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batches[0][:, 1:].flatten(), reduction="sum")
    loss.backward()
    g = seen["y"].grad.reshape(-1, seen["y"].shape[-1]).double()
    torch.testing.assert_close(full[1][o], g.t() @ g / batches[0].numel())


@pytest.mark.parametrize("model_type,head_rows", [("llama", 256), ("qwen3", 256), ("gemma2", 256), ("gpt2", 256),
                                                   ("falcon", 256), ("opt", 256), ("llama", 5), ("gemma2", 4),
                                                   ("llama", 11)])  # 12-token windows: the last chunk ends before the last position
def test_layerwise_fisher_equals_the_whole_model_backward(model_type, head_rows, monkeypatch):
    """The pass runs one layer at a time (forward keeping inputs, backward recomputing each layer); the reference
    is one backward through the whole model with every output projection's output gradient retained. A small
    ``_HEAD_ROWS`` takes the LM head a few positions at a time, as a long window at a large vocabulary is."""
    import llmprune.calibration.fisher as fisher_mod

    monkeypatch.setattr(fisher_mod, "_HEAD_ROWS", head_rows)
    model = tiny_causal_lm(model_type).eval()
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    fisher = output_fisher(model, adapter, [ids[:2], ids[2:]], labels="data")
    outs, handles = {}, []

    def keep(module, args, out):
        out.retain_grad()
        outs[module] = out

    for layer in adapter.decoder_layers(model):
        for spec in (adapter.attention(layer), adapter.ffn(layer)):
            handles.append(spec.output.module.register_forward_hook(keep))
    loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="sum")
    loss.backward()
    for h in handles:
        h.remove()
    for i, layer in enumerate(adapter.decoder_layers(model)):
        assert set(fisher[i]) == {s.output.module for s in (adapter.attention(layer), adapter.ffn(layer))}
        for m, f in fisher[i].items():
            g = outs[m].grad.reshape(-1, outs[m].shape[-1]).double()
            ref = g.t() @ g / ids.numel()  # float32 gradients: the head's chunks round their matmuls apart
            torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def _exact_true_fisher(model, module, ids):
    """``1/N Σ_s Σ_t J_tsᵀ (diag p_t - p_t p_tᵀ) J_ts`` for the output ``y_s`` of ``module``: the expectation of
    ``g gᵀ`` when every next token is drawn from the model's own prediction (the labels are independent across
    positions and ``E[e_y - p] = 0``, so only these terms survive). ``J`` from autograd's full Jacobian."""
    seen = {}
    h = module.register_forward_hook(lambda m, a, out: seen.setdefault("y", out.detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    y0 = seen["y"]

    def logits_of(y):
        h = module.register_forward_hook(lambda m, a, out: y)
        try:
            return model(ids).logits[0, :-1].double()
        finally:
            h.remove()

    jac = torch.autograd.functional.jacobian(logits_of, y0)[:, :, 0].double()  # [T-1, V, T, d]
    with torch.no_grad():
        p = torch.softmax(model(ids).logits[0, :-1].double(), -1)
    cov = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [T-1, V, V]
    f = torch.einsum("tvsd,tvw,twse->de", jac, cov, jac)
    return f / ids.numel()


def test_model_labelled_fisher_estimates_the_true_fisher():
    model = tiny_causal_lm("llama").eval()
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    o = adapter.attention(adapter.decoder_layers(model)[1]).output.module
    exact = _exact_true_fisher(model, o, ids)
    one = output_fisher(model, adapter, [ids], labels="model", seed=5)[1][o]
    torch.testing.assert_close(one, output_fisher(model, adapter, [ids], labels="model", seed=5)[1][o])  # seeded
    assert not torch.allclose(one, output_fisher(model, adapter, [ids], labels="model", seed=6)[1][o])
    n = 400
    mean = sum(output_fisher(model, adapter, [ids], labels="model", seed=s)[1][o] for s in range(n)) / n
    # Monte-Carlo error ~ 1/sqrt(n): 0.22 / 0.11 / 0.06 at 100 / 400 / 1600 seeds (no bias left at 1600)
    assert float((mean - exact).norm() / exact.norm()) < 0.15
    data = output_fisher(model, adapter, [ids], labels="data")[1][o]  # the empirical Fisher is another matrix
    assert float((data - exact).norm() / exact.norm()) > 0.2
    with pytest.raises(ValueError, match="labels"):
        output_fisher(model, adapter, [ids], labels="uniform")


FAMILIES = [t for t in CAUSAL_LM_TYPES if t in ("llama", "qwen3", "phi3", "gpt2", "falcon", "gpt_neox", "opt")]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("allocation", ["fisher", "uniform"])
def test_obs_prunes_every_family_and_reloads_in_a_fresh_process(tmp_path, model_type, allocation):
    model = tiny_causal_lm(model_type).eval()
    calib = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(ids).logits
    result = prune(model, PruneConfig(heads=0.5, ffn=0.25, method="obs", allocation=allocation, batch_size=4,
                                      fisher_samples=4), calibration=calib, progress=False)
    assert result.params_after < result.params_before
    with torch.no_grad():
        pruned = model(ids).logits
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, dense)
    out = result.save(tmp_path / "m")  # verified reload (fresh process) inside save
    assert_reloads_identically(model, out, ids)


def test_fisher_allocation_keeps_each_kinds_total(ref_model):
    model, tok = ref_model
    cfg = PruneConfig(heads=0.25, ffn=0.25, method="obs", allocation="fisher", n_samples=8, fisher_samples=8)
    result = prune(model, cfg, tokenizer=tok, calibration="../shared/data/reference-train.txt", progress=False)
    layers = result.plan.layers
    assert result.config.attention_unit == "group"  # 8 query / 4 KV heads at 0.25: one whole group per layer
    assert sum(8 - len(lp.kept_heads) for lp in layers) == 12  # 25% of 48 heads, anywhere
    assert sum(768 - len(lp.kept_neurons) for lp in layers) == 6 * 192
    assert len({len(lp.kept_neurons) for lp in layers}) > 1  # per-layer widths


def test_obs_refuses_what_it_does_not_do():
    model = tiny_causal_lm("llama")
    calib = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="supports allocation fisher, error, uniform, not 'global'"):
        prune(model, PruneConfig(ffn=0.25, allocation="global"), calibration=calib, progress=False)
    with pytest.raises(ValueError, match="method 'wanda' supports allocation .*not 'fisher'"):
        prune(model, PruneConfig(ffn=0.25, method="wanda", allocation="fisher"), calibration=calib, progress=False)


def test_a_bare_config_is_the_default_recipe_everywhere():
    """One default: PruneConfig's fields are the recipe the CLI and streaming run; the allocation is the method's
    own, resolved before any work and named in the result."""
    cfg = PruneConfig(heads=0.25, ffn=0.25)
    assert (cfg.method, cfg.allocation, cfg.n_samples, cfg.seq_len, cfg.fisher_labels) == ("obs", None, 128, 1024,
                                                                                          "model")
    from llmprune.cli import build_parser
    from llmprune.cli._common import config_from_args

    args = build_parser().parse_args(["prune", "M", "--heads", "0.25", "--ffn", "0.25", "--out", "O"])
    assert config_from_args(PruneConfig, args) == cfg
    args = build_parser().parse_args(["prune", "M", "--heads", "0.25", "--out", "O", "--fisher-labels", "data",
                                      "--method", "wanda", "--n-samples", "8", "--reconstruct"])
    assert config_from_args(PruneConfig, args) == PruneConfig(heads=0.25, fisher_labels="data", method="wanda",
                                                              n_samples=8, reconstruct=True)
    model = tiny_causal_lm("llama")
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    done = prune(model, PruneConfig(heads=0.5, ffn=0.25, batch_size=2, fisher_samples=2), calibration=calib,
                 progress=False).config
    assert (done.method, done.allocation) == ("obs", "fisher") and done.attention_unit in ("group", "query")
    wanda = prune(tiny_causal_lm("llama"), PruneConfig(ffn=0.25, method="wanda"), calibration=calib,
                  progress=False).config
    assert wanda.allocation == "uniform"


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("llama", False), ("qwen3", False)])
def test_layers_and_experts_keep_their_criteria_then_obs_prunes_units(tmp_path, model_type, tied):
    """--layers with the default method: Block Influence removes the layers, obs prunes what is left; the one plan,
    in original layer numbers, replays on a fresh copy (apply_plan) to the same model."""
    from llmprune.structured.apply import apply_plan

    model = tiny_causal_lm(model_type, tie_word_embeddings=tied).eval()
    twin = tiny_causal_lm(model_type, tie_word_embeddings=tied).eval()
    twin.load_state_dict(model.state_dict())
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    result = prune(model, PruneConfig(heads=0.5, ffn=0.25, layers=1, batch_size=2, fisher_samples=2),
                   calibration=calib, progress=False)
    assert len(result.plan.removed_layers) == 1 and result.config.method == "obs"
    kept = [lp for i, lp in enumerate(result.plan.layers) if i not in result.plan.removed_layers]
    assert all(lp.kept_neurons is not None for lp in kept)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    out = result.save(tmp_path / "m")  # verified reload (fresh process) inside save
    assert_reloads_identically(model, out, ids)
    apply_plan(twin, result.plan)  # same shapes as the pruned model (obs refits weights, so values differ)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "qwen3"])
def test_obs_with_bias_compensation_refits_biases_and_reloads(tmp_path, model_type):
    """``bias_compensation`` with obs: o_proj / down_proj get a bias, refitted with the kept columns (a
    constant input of 1 in the least squares), declared in the config, and the save reloads identically."""
    model = tiny_causal_lm(model_type).eval()
    adapter = get_adapter(model)
    calib = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="obs", allocation="fisher", batch_size=4, fisher_samples=4,
                      bias_compensation=True)
    if model_type == "qwen3":  # its config cannot declare an MLP bias: refused before anything changes
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="cannot declare"):
            prune(model, cfg, calibration=calib, progress=False)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    result = prune(model, cfg, calibration=calib, progress=False)
    for layer in adapter.decoder_layers(model):
        for spec in (adapter.attention(layer), adapter.ffn(layer)):
            bias = spec.output.module.bias
            assert bias is not None and torch.isfinite(bias).all() and bias.abs().sum() > 0
    out = result.save(tmp_path / "m")
    assert_reloads_identically(model, out, ids)
