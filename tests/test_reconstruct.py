"""Reconstruction after structured pruning: the least-squares refit (pure functions) and the sequential pass.

- On a constructed layer the refit's output error never exceeds the plain slice's and, undamped, equals
  the closed-form least-squares solution (``torch.linalg.lstsq``); a bias is refitted as a constant input.
- ``removal_error_curve`` agrees with the errors of explicit slices and refits.
- ``prune(..., reconstruct=True)`` on every family: the pruned model equals the original whose output
  projections carry the refitted weights (zeros at removed columns), i.e. surgery, refit and config agree;
  each layer's refit is the least-squares fit on the inputs of the *already pruned* previous layers.
- The refitted model is what is saved: it reloads identically in a fresh process, and the recipe says so.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import llmprune
import llmprune.structured.pipeline  # the old path is a re-export module, loaded only when imported
from llmprune import PruneConfig, prune
from llmprune.arch import get_adapter
from llmprune.arch.base import weight_matrix
from llmprune.checkpoint.io import read_recipe, save_pruned
from llmprune.structured.reconstruct import augment_gram, output_error, refit_columns, removal_error_curve
from llmprune.structured.sequential import output_modules
from llmprune.arch.surgery import _complement

from tiny_models import assert_reloads_identically, tiny_causal_lm


def _layer(seed=0, out=12, inp=20, tokens=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    x[:, 3] = 0.7 * x[:, 1] - 0.2 * x[:, 5] + 0.05 * x[:, 3]   # correlated features: refit has something to do
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return w, x


def _err(w, x, new, kept):
    return float(((x @ w.t()) - x[:, kept] @ new.t()).pow(2).sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("percdamp", [0.0, 0.01, 0.5])
def test_refit_never_worse_than_slice(seed, percdamp):
    w, x = _layer(seed)
    kept = torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:11].sort().values
    new = refit_columns(w, x.t() @ x, kept, percdamp)
    assert new.shape == (12, 11) and new.dtype == w.dtype
    assert _err(w, x, new, kept) <= _err(w, x, w[:, kept], kept) + 1e-9
    # the Gram-matrix form of the error is the same number
    assert output_error(w, x.t() @ x, new, kept) == pytest.approx(_err(w, x, new, kept), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_undamped_refit_is_least_squares(seed):
    w, x = _layer(seed)
    kept = torch.tensor([0, 2, 3, 7, 8, 11, 15, 19])
    new = refit_columns(w, x.t() @ x, kept, percdamp=0.0)
    closed = torch.linalg.lstsq(x[:, kept], x @ w.t()).solution.t()  # argmin ||X W^T - X_K V^T||
    torch.testing.assert_close(new, closed, rtol=1e-8, atol=1e-10)


def test_bias_refit_is_least_squares_with_a_constant_input():
    w, x = _layer(5)
    x = x + 0.8  # non-zero means: a bias can absorb them
    b = torch.randn(12, dtype=torch.float64)
    kept = torch.arange(0, 20, 2)
    gram = augment_gram(x.t() @ x, x.sum(0), x.shape[0])
    full = torch.cat([w, b[:, None]], 1)
    new = refit_columns(full, gram, torch.cat([kept, torch.tensor([20])]), percdamp=0.0)
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    closed = torch.linalg.lstsq(torch.cat([x[:, kept], ones], 1), x @ w.t() + b).solution.t()
    torch.testing.assert_close(new, closed, rtol=1e-8, atol=1e-10)


def test_removal_error_curve_matches_explicit_removals():
    w, x = _layer(2)
    gram = x.t() @ x
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    plain = removal_error_curve(w, gram, order, 12, refit=False)
    refit = removal_error_curve(w, gram, order, 12, refit=True, percdamp=0.0)
    assert plain.shape == refit.shape == (13,) and plain[0] == refit[0] == 0
    for k in (1, 5, 12):
        kept = order[k:].sort().values
        assert float(plain[k]) == pytest.approx(_err(w, x, w[:, kept], kept), rel=1e-9)
        assert float(refit[k]) == pytest.approx(_err(w, x, refit_columns(w, gram, kept, 0.0), kept), rel=1e-7)
    assert torch.all(refit <= plain + 1e-9) and torch.all(refit[1:] >= refit[:-1] - 1e-9)


# ---- the sequential pass on real architectures --------------------------------------------------------
def _scattered_reference(original, pruned, plan):
    """The original model with every output projection replaced by the pruned one's weights, scattered back
    to the original columns (zeros where units were removed) and the pruned bias."""
    ref = copy.deepcopy(original)
    ad = get_adapter(ref)
    p_layers = get_adapter(pruned).decoder_layers(pruned)
    kept_layers = plan.kept_layers
    with torch.no_grad():
        for j, i in enumerate(kept_layers):
            layer, lp = ad.decoder_layers(ref)[i], plan.layers[i]
            for spec, kept, n in ((ad.attention(layer), lp.kept_heads, None), (ad.ffn(layer), lp.kept_neurons, None)):
                if spec is None or kept is None:
                    continue
                n = spec.num_heads if hasattr(spec, "num_heads") else spec.num_neurons
                module = spec.output.module
                name = next(k for k, m in layer.named_modules() if m is module)
                new_mod = p_layers[j].get_submodule(name)
                w = weight_matrix(module)
                drop = torch.zeros(w.shape[1], dtype=torch.bool)
                drop[spec.output.indices(_complement(kept, n))] = True
                full = torch.zeros_like(w)
                full[:, ~drop] = weight_matrix(new_mod)
                w.copy_(full)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(new_mod.bias)
    return ref


_FAMILIES = ["llama", "qwen2", "phi3", "gpt2", "opt", "gpt_neox", "falcon:new", "gemma2"]


@pytest.mark.parametrize("model_type", _FAMILIES)
def test_reconstructed_model_equals_refitted_original(model_type):
    original = tiny_causal_lm(model_type)
    model = copy.deepcopy(original)
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="wanda", reconstruct=True, attention_unit="query")
    result = prune(model, cfg, calibration=calib, progress=False)
    ref = _scattered_reference(original, model, result.plan)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(model(ids).logits, original(ids).logits)
    # the refit changed the kept weights (it is not a plain slice)
    ad = get_adapter(model)
    o = ad.attention(ad.decoder_layers(model)[0]).output.module
    o0 = ad.attention(ad.decoder_layers(original)[0]).output.module
    assert not any(torch.equal(weight_matrix(o), weight_matrix(o0)[:, c:c + weight_matrix(o).shape[1]])
                   for c in range(weight_matrix(o0).shape[1] - weight_matrix(o).shape[1] + 1))


def test_refit_uses_inputs_of_already_pruned_layers():
    """Layer 1's down_proj refit is the least-squares fit on the inputs that the *pruned* layer 0 produces."""
    original = tiny_causal_lm("llama")
    model = copy.deepcopy(original)
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = PruneConfig(ffn=0.5, method="wanda", reconstruct=True, percdamp=0.01)
    result = prune(model, cfg, calibration=calib, progress=False)
    # Inputs of layer 1's (original) MLP in the pruned model: run pruned layer 0, then original layer 1.
    hybrid = copy.deepcopy(original)
    hybrid.model.layers[0] = model.model.layers[0]
    xs = []
    down = hybrid.model.layers[1].mlp.down_proj
    h = down.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for batch in calib.split(8):
            hybrid(batch)
    h.remove()
    x = torch.cat(xs)
    kept = torch.tensor(result.plan.layers[1].kept_neurons)
    expected = refit_columns(original.model.layers[1].mlp.down_proj.weight, x.t() @ x, kept, 0.01)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, expected, atol=1e-5, rtol=1e-4)
    # and it differs from the fit on the dense model's inputs
    xs.clear()
    h = original.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        original(calib)
    h.remove()
    xd = torch.cat(xs)
    dense_fit = refit_columns(original.model.layers[1].mlp.down_proj.weight, xd.t() @ xd, kept, 0.01)
    assert not torch.allclose(dense_fit, expected, atol=1e-4)


def test_reconstruct_with_bias_compensation_refits_a_new_bias(tmp_path):
    model = tiny_causal_lm("llama")
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="flap", reconstruct=True, bias_compensation=True)
    result = prune(model, cfg, calibration=calib, progress=False)
    assert model.config.attention_bias and model.config.mlp_bias
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0  # refitted, not the zero it started as
    save_pruned(model, tmp_path / "m", config=cfg, plan=result.plan)
    assert_reloads_identically(model, tmp_path / "m", torch.randint(0, 128, (2, 9)))


def test_output_modules_cover_every_family():
    for t in _FAMILIES:
        model = tiny_causal_lm(t)
        ad = get_adapter(model)
        assert len(output_modules(ad, ad.decoder_layers(model)[0])) == 2, t


def test_reconstructed_model_reloads_identically_in_a_fresh_process(tmp_path):
    model = tiny_causal_lm("llama")
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    cfg = PruneConfig(heads=0.5, ffn=0.25, method="wanda", reconstruct=True, allocation="error")
    result = prune(model, cfg, calibration=calib, progress=False)
    out = tmp_path / "m"
    save_pruned(model, out, config=cfg, plan=result.plan)
    recipe = read_recipe(out)
    assert recipe["config"]["reconstruct"] is True and recipe["config"]["allocation"] == "error"
    assert PruneConfig.from_dict(recipe["config"]) == cfg
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch, llmprune; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, attn_implementation='eager').eval();"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True);"
        f"torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=0, rtol=0)
    assert json.loads((out / "config.json").read_text())["model_type"].endswith("llama")
    assert llmprune  # imported for the per-layer classes


def test_cli_reconstruct_records_it_in_the_recipe(tmp_path, ref_model_path, shared_dir, capsys):
    from llmprune.cli import main

    out = tmp_path / "out"
    rc = main(["prune", str(ref_model_path), "--heads", "0.25", "--ffn", "0.25", "--method", "magnitude",
               "--reconstruct", "--out", str(out), "--quiet"])
    assert rc == 2 and "needs calibration data" in capsys.readouterr().err and not out.exists()
    rc = main(["prune", str(ref_model_path), "--heads", "0.25", "--ffn", "0.25", "--reconstruct", "--allocation",
               "error", "--calib", str(shared_dir / "data" / "reference-train.txt"), "--n-samples", "4",
               "--seq-len", "64", "--out", str(out), "--quiet"])
    assert rc == 0
    cfg = read_recipe(out)["config"]
    assert cfg["reconstruct"] is True and cfg["allocation"] == "error" and cfg["percdamp"] == 0.01
    reloaded, _ = llmprune.checkpoint.io.load_model(out)
    assert llmprune.structured.pipeline.count_parameters(reloaded) < 6_819_072
