"""The README support matrix is generated from the adapter registry, never written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmprune.checkpoint.support import MARKER_END, MARKER_START, replace_readme_block, support_matrix, support_matrix_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_moe_and_encoder_rows():
    rows = {r["family"]: r for r in support_matrix()}
    assert rows["Qwen3-MoE"]["experts"] and rows["Mixtral"]["experts"]
    assert rows["BERT (encoder)"]["heads"] and not rows["BERT (encoder)"]["experts"]
    assert "| experts |" in support_matrix_markdown().splitlines()[0]


def test_readme_block_matches_registry():
    text = README.read_text(encoding="utf-8") if README.is_file() else ""
    if MARKER_START not in text:
        pytest.skip("README.md has no support-matrix block yet")
    assert replace_readme_block(text) == text, "README support matrix is stale: run scripts/update_support_matrix.py"


def test_replace_block(tmp_path):
    text = f"intro\n{MARKER_START}\nold table\n{MARKER_END}\noutro\n"
    new = replace_readme_block(text)
    assert "old table" not in new and support_matrix_markdown() in new and new.endswith(f"{MARKER_END}\noutro\n")
    assert replace_readme_block(new) == new  # idempotent
    assert replace_readme_block("no markers") is None


def _claims() -> dict[str, str]:
    from llmprune.arch import registered_adapters

    return {t: loads for a in registered_adapters() for t, loads in a.describe()["standard_outputs"].items()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2",
                                    "opt", "gpt_neox", "falcon", "falcon:new", "qwen3_moe", "mixtral"])
def test_loads_without_llmprune_column_is_true(family):
    """The matrix's 'uniform' column, checked: head-pruned (heads not dividing hidden_size) and FFN-pruned
    uniform outputs get the config type the column promises."""
    from llmprune import PruneConfig, prune
    from llmprune.arch.base import ALL_UNIFORM

    from tiny_models import MOE_CONFIGS, TINY_CONFIGS, base_type, tiny_causal_lm, tiny_moe

    model_type = base_type(family)
    build = tiny_moe if family in MOE_CONFIGS else tiny_causal_lm
    config = (MOE_CONFIGS if family in MOE_CONFIGS else TINY_CONFIGS)[family]
    gqa = "head_dim" in config or "num_kv_heads" in config  # 8 query / 4 KV heads of 8 dims: keeping 6 of them
    over = {}                                                  # does not divide hidden_size 64
    if gqa:
        over = (dict(num_attention_heads=8, num_kv_heads=4) if "num_kv_heads" in config else
                dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8))
    heads = build(family, **over)
    prune(heads, PruneConfig(heads=0.25, method="magnitude", attention_unit="group" if gqa else "query"),
          progress=False)
    n_heads = heads.config.to_dict().get("llmprune_layer_widths") or [{"heads": heads.config.num_attention_heads}]
    assert 64 % n_heads[0]["heads"] != 0
    ffn = build(family)
    prune(ffn, PruneConfig(ffn=0.25, method="magnitude"), progress=False)
    assert ffn.config.model_type == model_type  # every family keeps FFN-only outputs standard
    claim = _claims()[model_type]
    if claim == ALL_UNIFORM:
        assert heads.config.model_type == model_type
    elif claim.startswith("all (head-pruned: as "):
        assert heads.config.model_type == claim.removeprefix("all (head-pruned: as ").rstrip(")")
    else:
        assert heads.config.model_type == "llmprune_" + model_type
