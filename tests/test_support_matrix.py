"""The README support matrix is generated from the adapter registry, never written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmprune.support import MARKER_END, MARKER_START, replace_readme_block, support_matrix, support_matrix_markdown

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
