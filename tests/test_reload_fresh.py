"""Saved outputs reload in a *fresh process* with identical logits, as a user's would (issue #10).

Every family x {uniform, global} x {tied, untied output embedding}: a random model is written with
``save_pretrained`` and loaded back with ``from_pretrained`` (a user's checkpoint, with whatever key renames
transformers applies), pruned, saved by ``save_pruned`` (which verifies), then reloaded in one batched
subprocess. Outputs in a standard config are loaded there *before* llmprune is imported, proving they need
no llmprune; per-layer outputs are loaded after ``import llmprune``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmprune
from llmprune import PruneConfig, prune
from llmprune.checkpoint.io import VerificationError, save_pruned

from tiny_models import CAUSAL_LM_TYPES, LIGHT_VARIANTS, MOE_CONFIGS, tiny_causal_lm, tiny_moe

FAMILIES = [t for t in CAUSAL_LM_TYPES if t not in LIGHT_VARIANTS] + list(MOE_CONFIGS)
CASES = [(f, a, t) for f in FAMILIES for a in ("uniform", "global") for t in ("tied", "untied")]

#: loads every folder listed in argv[1] (a JSON list), standard configs first without llmprune
_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
jobs = json.load(open(sys.argv[1]))
results = {}
for standard in (True, False):
    if not standard:
        import llmprune  # registers the per-layer classes
    for job in jobs:
        if job["standard"] != standard:
            continue
        attn = job.get("attn", "eager")
        model = AutoModelForCausalLM.from_pretrained(job["folder"], attn_implementation=attn).eval()
        ids = torch.load(job["ids"], weights_only=True)
        with torch.no_grad():
            torch.save(model(ids).logits, job["logits"])
        results[job["key"]] = {"class": type(model).__name__, "llmprune_imported": "llmprune" in sys.modules}
json.dump(results, open(sys.argv[2], "w"))
"""


def _user_checkpoint(family: str, tied: bool, folder: Path):
    """A model as users have it: written by ``save_pretrained``, loaded back by ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    build = tiny_moe if family in MOE_CONFIGS else tiny_causal_lm
    model = build(family, tie_word_embeddings=tied)
    model.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    assert (out.weight.data_ptr() == inp.weight.data_ptr()) == tied, "tied/untied parametrisation not honoured"
    return model


def _fresh_process_load(jobs: list[dict], workdir: Path) -> dict:
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    script = workdir / "load.py"
    script.write_text(_LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), str(workdir / "jobs.json"), str(workdir / "results.json")],
                   check=True, env=env, cwd=workdir)
    return json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Prune and save every case in this process, reload all of them in one fresh process."""
    root = tmp_path_factory.mktemp("fresh")
    jobs, expected = [], {}
    for family, allocation, tied in CASES:
        key = f"{family}-{allocation}-{tied}".replace(":", "_")
        model = _user_checkpoint(family, tied == "tied", root / f"{key}-src")
        cfg = PruneConfig(heads=0.5, ffn=0.25, method="magnitude", allocation=allocation, attention_unit="query",
                          experts=0.25 if family in MOE_CONFIGS else 0.0)
        prune(model, cfg, progress=False)
        out = save_pruned(model, root / key, config=cfg)
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        torch.save(ids, root / f"{key}-ids.pt")
        with torch.no_grad():
            expected[key] = model(ids).logits
        standard = not json.loads((out / "config.json").read_text())["model_type"].startswith("llmprune_")
        jobs.append({"key": key, "folder": str(out), "ids": str(root / f"{key}-ids.pt"),
                     "logits": str(root / f"{key}-logits.pt"), "standard": standard, "class": type(model).__name__})
    results = _fresh_process_load(jobs, root)
    return {job["key"]: (job, expected[job["key"]], results[job["key"]]) for job in jobs}


@pytest.mark.parametrize("family,allocation,tied", CASES)
def test_fresh_process_reload_identical(reloaded, family, allocation, tied):
    job, expected, result = reloaded[f"{family}-{allocation}-{tied}".replace(":", "_")]
    assert result["class"] == job["class"]
    if job["standard"]:
        assert not result["llmprune_imported"], "a standard output must load without llmprune"
    got = torch.load(job["logits"], weights_only=True)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_head_pruned_llama_saved_as_mistral(tmp_path, tied):
    """8 query / 4 KV heads keeping 6 / 3: LlamaConfig rejects 64 % 6, so the output is saved as the exactly
    equivalent Mistral config (explicit head_dim) and loads in plain transformers with identical logits."""
    model = tiny_causal_lm("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                           tie_word_embeddings=tied)
    prune(model, PruneConfig(heads=0.25, ffn=0.25, method="magnitude"), progress=False)
    out = save_pruned(model, tmp_path / "m")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "mistral" and saved["num_attention_heads"] == 6 and saved["head_dim"] == 8
    assert saved["tie_word_embeddings"] == tied and saved.get("sliding_window") is None
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    job = {"key": "m", "folder": str(out), "ids": str(tmp_path / "ids.pt"), "logits": str(tmp_path / "l.pt"),
           "standard": True}
    result = _fresh_process_load([job], tmp_path)["m"]
    assert result["class"] == "MistralForCausalLM" and not result["llmprune_imported"]
    torch.testing.assert_close(torch.load(tmp_path / "l.pt", weights_only=True), expected, atol=0, rtol=0)


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True)])
def test_llama_with_biases_is_not_rewritten_as_mistral(tmp_path, field, value):
    """Mistral has no biases: a Llama using them has no exact standard twin and keeps the per-layer class."""
    model = tiny_causal_lm("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8, **{field: value})
    prune(model, PruneConfig(heads=0.25, method="magnitude"), progress=False)
    out = save_pruned(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llmprune_llama"


def test_gpt_neox_issue_case_reloads_identically(tmp_path, shared_dir):
    """The reported failure: an untied GPT-NeoX checkpoint written by save_pretrained, pruned from the CLI with
    --heads 0.34 --rounding nearest --ffn 0.25 --method wanda, reloaded with a random output head."""
    from transformers import AutoTokenizer

    from llmprune.cli import main

    tok = AutoTokenizer.from_pretrained(shared_dir / "models" / "ref-llama-7m")
    model = tiny_causal_lm("gpt_neox", vocab_size=len(tok), tie_word_embeddings=False)
    src, out = tmp_path / "neox", tmp_path / "pruned"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    assert "embed_out.weight" in load_file(src / "model.safetensors")
    main(["prune", str(src), "--heads", "0.34", "--rounding", "nearest", "--ffn", "0.25", "--method", "wanda",
          "--calib", str(shared_dir / "data" / "reference-train.txt"), "--n-samples", "4", "--seq-len", "64",
          "--out", str(out), "--quiet"])
    widths = json.loads((out / "config.json").read_text())["llmprune_layer_widths"]
    assert [w["heads"] for w in widths] == [3, 3, 3]  # 4 * 0.34 = 1.36 -> 1 head removed per layer
    ids = tok("The history of the city is long and", return_tensors="pt").input_ids
    pruned, _ = llmprune.checkpoint.io.load_model(out)  # in-process reference: the folder the CLI verified
    with torch.no_grad():
        expected = pruned(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    job = {"key": "neox", "folder": str(out), "ids": str(tmp_path / "ids.pt"), "logits": str(tmp_path / "l.pt"),
           "standard": False, "attn": pruned.config._attn_implementation}
    _fresh_process_load([job], tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "l.pt", weights_only=True), expected, atol=0, rtol=0)
    # and the head is the trained one, not a fresh initialisation
    saved = load_file(out / "model.safetensors")
    head = next(v for k, v in saved.items() if k.endswith(("embed_out.weight", "lm_head.weight")))
    torch.testing.assert_close(head, model.get_output_embeddings().weight.detach())


def test_head_pruned_reference_llama_loads_without_llmprune(tmp_path, ref_model, shared_dir):
    """ref-llama-7m keeping 6 of 8 query heads (3 of 4 KV groups): plain transformers loads it, identical logits."""
    model, tok = ref_model
    cfg = PruneConfig(heads=0.25, method="wanda", n_samples=4, seq_len=64)
    prune(model, cfg, tokenizer=tok, calibration=shared_dir / "data" / "reference-train.txt", progress=False)
    out = save_pruned(model, tmp_path / "m", tokenizer=tok, config=cfg)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "mistral" and saved["num_attention_heads"] == 6
    ids = tok("The history of the city", return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    job = {"key": "ref", "folder": str(out), "ids": str(tmp_path / "ids.pt"), "logits": str(tmp_path / "l.pt"),
           "standard": True, "attn": model.config._attn_implementation}
    result = _fresh_process_load([job], tmp_path)["ref"]
    assert result["class"] == "MistralForCausalLM" and not result["llmprune_imported"]
    torch.testing.assert_close(torch.load(tmp_path / "l.pt", weights_only=True), expected, atol=0, rtol=0)


def _drop_one_tensor(model):
    """Make ``model.save_pretrained`` write a checkpoint that lacks one tensor (a corrupt save)."""
    original = model.save_pretrained

    def broken(folder, *args, **kwargs):
        original(folder, *args, **kwargs)
        path = Path(folder) / "model.safetensors"
        tensors = load_file(path)
        victim = next(k for k in tensors if "mlp" in k or "experts" in k)
        del tensors[victim]
        save_file(tensors, path, metadata={"format": "pt"})

    model.save_pretrained = broken


def _perturb_one_tensor(model):
    original = model.save_pretrained

    def broken(folder, *args, **kwargs):
        original(folder, *args, **kwargs)
        path = Path(folder) / "model.safetensors"
        tensors = load_file(path)
        victim = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 2 and "embed" not in k)
        tensors[victim] = tensors[victim] * 3
        save_file(tensors, path, metadata={"format": "pt"})

    model.save_pretrained = broken


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_verification_catches_dropped_tensor(tmp_path, family, verify):
    model = tiny_causal_lm(family)
    prune(model, PruneConfig(heads=0.5, ffn=0.25, method="magnitude"), progress=False)
    _drop_one_tensor(model)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="missing"):
        save_pruned(model, out, verify=verify)
    assert list(tmp_path.iterdir()) == [], "a failed save must leave nothing behind"


def test_verification_catches_wrong_values(tmp_path):
    model = tiny_causal_lm("qwen3")
    prune(model, PruneConfig(heads=0.5, ffn=0.25, method="magnitude"), progress=False)
    _perturb_one_tensor(model)
    with pytest.raises(VerificationError, match="differ"):
        save_pruned(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_keeps_existing_output(tmp_path):
    """--overwrite onto an existing folder: a failed verification keeps the old folder untouched."""
    out = tmp_path / "out"
    good = tiny_causal_lm("llama")
    save_pruned(good, out)
    before = sorted(p.name for p in out.iterdir())
    model = tiny_causal_lm("llama", seed=1)
    _drop_one_tensor(model)
    with pytest.raises(VerificationError):
        save_pruned(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_ROPE = [None,
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0},
         {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
         {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}]


@pytest.mark.parametrize("rope", _ROPE, ids=lambda r: r["rope_type"] if r else "default")
def test_mistral_twin_computes_what_the_masked_llama_does(tmp_path, rope):
    """The standard twin is exact, rope scaling included: the saved Mistral's logits equal the *original Llama*
    with the removed heads masked, at positions beyond the original context (where scaling matters)."""
    import copy

    from transformers import AutoModelForCausalLM

    from masking import mask_model

    kwargs = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    if rope:
        kwargs["rope_parameters"] = rope
    original = tiny_causal_lm("llama", **kwargs)
    model = copy.deepcopy(original)
    result = prune(model, PruneConfig(heads=0.25, ffn=0.25, method="magnitude"), progress=False)
    out = save_pruned(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "MistralForCausalLM"
    ids = torch.randint(0, 128, (2, 60), generator=torch.Generator().manual_seed(4))
    handles = mask_model(original, result.plan)
    try:
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, atol=2e-5, rtol=1e-4)
    finally:
        for h in handles:
            h.remove()


_IMPORT_FIRST = r"""
import sys, torch
import llmprune
modeling = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m
                  and not m.startswith("transformers.models.auto."))
assert not modeling, modeling  # the per-layer model classes are registered lazily
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
assert type(model).__name__.startswith("Pruned"), type(model).__name__
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
"""


def test_import_llmprune_first_then_per_layer_checkpoint_loads(tmp_path):
    """``import llmprune`` loads no modeling file; the first per-layer config registers its model classes."""
    model = tiny_causal_lm("llama", tie_word_embeddings=False)
    prune(model, PruneConfig(heads=0.25, ffn=0.25, allocation="global", method="magnitude"), progress=False)
    out = save_pruned(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llmprune_llama"
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    torch.save(ids, tmp_path / "ids.pt")
    r = subprocess.run([sys.executable, "-c", _IMPORT_FIRST, str(out), str(tmp_path / "ids.pt"),
                        str(tmp_path / "logits.pt")], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with torch.no_grad():
        expected = model.eval()(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-5, rtol=1e-5)
