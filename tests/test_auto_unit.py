"""Defaults that never wreck a model (issue 23): ``attention_unit="auto"`` (the default) resolved once per model,
a non-zero ratio that would remove nothing refused before any work, and single-KV-group (MQA) models pruned by
query heads with outputs that reload in a fresh process with identical logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llmprune import PruneConfig, RatioError, prune
from llmprune.cli import main
from llmprune.checkpoint.io import read_recipe, save_pruned
from llmprune.structured.select import resolve_attention_unit

from tiny_models import tiny_causal_lm, tiny_moe


@pytest.mark.parametrize("ratio,num_heads,num_kv,expected", [
    (0.25, 4, 4, "group"),     # MHA: identical either way
    (0.5, 12, 12, "group"),
    (0.25, 4, 1, "query"),     # MQA: the only group cannot go
    (0.25, 9, 3, "query"),     # SmolLM2: 2-4 groups -> query
    (0.5, 8, 4, "query"),      # both remove 4 heads: a tie goes to query with <= 4 groups
    (0.25, 8, 4, "group"),     # 2 heads as 1 group; query could only remove 4 (one per group)
    (0.25, 32, 8, "group"),    # 2 whole groups
    (0.1, 32, 8, "group"),     # 1 group (0.125) is closer than 0 or 8 query heads
    (0.2, 32, 8, "group"),     # both remove 8 heads: a tie goes to group with > 4 groups
    (0.05, 32, 8, "group"),    # both round to nothing (check_ratios then refuses the ratio)
    (0.15, 32, 4, "query"),    # query: 4 heads (0.125); group: 8 heads (0.25)
    (0.28, 40, 8, "group"),    # 2 groups (0.25) vs 8 query heads (0.2)
    (0.42, 40, 8, "query"),    # 16 query heads (0.4) vs 3 groups (0.375)
])
def test_resolve_attention_unit(ratio, num_heads, num_kv, expected):
    assert resolve_attention_unit(ratio, num_heads, num_kv) == expected


def test_auto_is_the_default_and_validated():
    assert PruneConfig().attention_unit == "auto"
    with pytest.raises(ValueError, match="auto, group, query"):
        PruneConfig(attention_unit="kv")


@pytest.mark.parametrize("kwargs,unit,heads,kv", [
    (dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16), "query", 2, 2),
    (dict(num_attention_heads=16, num_key_value_heads=8, head_dim=4), "group", 12, 6),
])
def test_prune_works_on_the_resolved_config(tmp_path, kwargs, unit, heads, kv):
    model = tiny_causal_lm("llama", **kwargs)
    cfg = PruneConfig(heads=0.25 if unit == "group" else 0.5, method="magnitude")
    result = prune(model, cfg, progress=False)
    assert cfg.attention_unit == "auto"  # the caller's config is left alone
    assert result.config.attention_unit == unit and result.config.heads == cfg.heads
    assert model.config.num_attention_heads == heads and model.config.num_key_value_heads == kv
    out = result.save(tmp_path / "m")
    assert read_recipe(out)["config"]["attention_unit"] == unit


def test_cli_recipe_and_table_name_the_unit(tmp_path, ref_model_path, capsys):
    """ref-llama-7m: 8 query / 4 KV heads, so auto means query (one head of every group: 4 at a time)."""
    out = tmp_path / "m"
    assert main(["prune", str(ref_model_path), "--heads", "0.5", "--method", "magnitude", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "query attention units" in text and "attention heads" in text and "0.500" in text
    recipe = read_recipe(out)
    assert recipe["config"]["attention_unit"] == "query" and recipe["run"]["prune"]["attention_unit"] == "query"
    streamed = tmp_path / "s"
    assert main(["prune", str(ref_model_path), "--heads", "0.5", "--method", "magnitude", "--streaming",
                 "--out", str(streamed), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "requested" in text and "attention heads" in text  # requested vs achieved, streamed too
    recipe = read_recipe(streamed)
    assert recipe["config"]["attention_unit"] == "query" and recipe["run"]["prune"]["attention_unit"] == "query"
    assert json.loads((streamed / "config.json").read_text())["num_attention_heads"] == 4


# ---- a non-zero ratio that removes nothing ----------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["uniform", "global", "error", "block_influence"])
def test_heads_that_remove_nothing_are_refused(allocation):
    model = tiny_causal_lm("llama")  # 3 layers of 4 query / 2 KV heads: auto -> query, 2 heads at a time
    with pytest.raises(RatioError, match=r"--heads 0.05 would remove no attention head.*smallest ratio that "
                                         r"removes exactly one is 0\.(5|167)"):
        prune(model, PruneConfig(heads=0.05, method="magnitude", allocation=allocation), progress=False)


def test_global_heads_count_over_the_whole_model():
    """0.1 of 4 heads rounds to 0 units per layer, but 0.1 of the model's 12 heads is 0.6 units -> 1."""
    model = tiny_causal_lm("llama")
    with pytest.raises(RatioError, match="would remove no attention head"):
        prune(tiny_causal_lm("llama"), PruneConfig(heads=0.1, method="magnitude"), progress=False)
    result = prune(model, PruneConfig(heads=0.1, method="magnitude", allocation="global"), progress=False)
    assert result.params_after < result.params_before


@pytest.mark.parametrize("kwargs,match", [
    (dict(ffn=0.004), r"--ffn 0.004 would remove no FFN neuron.*exactly one is 0\.0104"),
    (dict(ffn=0.1, multiple_of=32), r"kept in multiples of 32.*exactly one is 0\.333"),
    (dict(ffn=0.004, allocation="global"), "would remove no FFN neuron"),
])
def test_ffn_that_removes_nothing_is_refused(kwargs, match):
    with pytest.raises(RatioError, match=match):
        prune(tiny_causal_lm("llama"), PruneConfig(method="magnitude", **kwargs), progress=False)


def test_experts_that_remove_nothing_are_refused():
    with pytest.raises(RatioError, match=r"--experts 0.05 would remove no expert.*exactly one is 0\.125"):
        prune(tiny_moe("mixtral"), PruneConfig(experts=0.05, method="magnitude"), progress=False)


def test_rounding_up_still_removes_one_unit():
    model = tiny_causal_lm("llama")
    prune(model, PruneConfig(heads=0.05, method="magnitude", rounding="up"), progress=False)
    assert model.config.num_attention_heads == 2


@pytest.mark.parametrize("flags", [["--heads", "0.05"], ["--ffn", "0.0005"]])
def test_cli_refuses_before_any_work(tmp_path, ref_model_path, capsys, flags):
    out = tmp_path / "o"
    assert main(["prune", str(ref_model_path), *flags, "--method", "magnitude", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would remove no" in err and "smallest ratio" in err
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- single KV group (MQA) ------------------------------------------------------------------------------
_LOADER = r"""
import json, sys, torch
import llmprune  # per-layer classes (a 3-head Falcon has no standard config)
from transformers import AutoModelForCausalLM
for job in json.load(open(sys.argv[1])):
    model = AutoModelForCausalLM.from_pretrained(job["folder"], attn_implementation="eager").eval()
    with torch.no_grad():
        torch.save(model(torch.load(job["ids"], weights_only=True)).logits, job["logits"])
"""

_MQA = {"llama": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
        "falcon": dict(num_attention_heads=4, multi_query=True)}


def _user_checkpoint(family: str, tied: bool, folder):
    from transformers import AutoModelForCausalLM

    tiny_causal_lm(family, tie_word_embeddings=tied, **_MQA[family]).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def test_mqa_prunes_query_heads_and_reloads_fresh(tmp_path, ref_model_path):
    from llmprune.arch import get_adapter

    jobs, expected = [], {}
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    for family in _MQA:
        for tied in (True, False):
            key = f"{family}-{'tied' if tied else 'untied'}"
            src = tmp_path / f"{key}-src"
            model = _user_checkpoint(family, tied, src)
            result = prune(model, PruneConfig(heads=0.25, method="magnitude"), progress=False)
            assert result.config.attention_unit == "query"
            adapter = get_adapter(model)
            for layer, lp in zip(adapter.decoder_layers(model), result.plan.layers):
                attn = adapter.attention(layer)
                assert (attn.num_heads, attn.num_kv_heads) == (3, 1) and lp.kept_kv_heads == [0]
            out = save_pruned(model, tmp_path / key)
            with torch.no_grad():
                expected[key] = model(ids).logits
            jobs.append({"folder": str(out), "ids": str(tmp_path / "ids.pt"), "logits": str(tmp_path / f"{key}.pt")})
            if family == "llama" and not tied:  # the CLI default (auto) prunes the same heads
                for f in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copy(ref_model_path / f, src / f)
                cli_out = tmp_path / f"{key}-cli"
                assert main(["prune", str(src), "--heads", "0.25", "--method", "magnitude", "--out", str(cli_out),
                             "--quiet"]) == 0
                assert read_recipe(cli_out)["config"]["attention_unit"] == "query"
                jobs.append({"folder": str(cli_out), "ids": str(tmp_path / "ids.pt"),
                             "logits": str(tmp_path / f"{key}-cli.pt")})
                expected[f"{key}-cli"] = expected[key]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "load.py").write_text(_LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "jobs.json")], check=True, env=env,
                   cwd=tmp_path)
    for key, logits in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / f"{key}.pt", weights_only=True), logits, atol=0, rtol=0,
                                   msg=key)
