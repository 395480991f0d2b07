"""scripts/bench_single_unit.py's own logic, without running the benchmark: its rows, and the held-out split
(the calibration text stops where the held-out windows begin)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_single_unit as bsu  # noqa: E402

from llmprune import PruneConfig
from llmprune.calibration.single_unit import SCORES


def test_rows_cover_every_score_and_the_baselines_at_both_settings():
    labels = [label for label, _ in bsu.rows()]
    assert labels[0] == "dense" and len(labels) == len(set(labels)) == 1 + 2 * (len(SCORES) + 3)
    for label, fields in bsu.rows()[1:]:
        cfg = PruneConfig(**fields)
        assert cfg.ffn == 0.25 and cfg.heads == (0.25 if label.startswith("heads25") else 0.0)
    scores = {PruneConfig(**f).single_unit_score for _, f in bsu.rows()[1:] if f.get("method") == "single-unit"}
    assert scores == set(SCORES)
    assert PruneConfig(**dict(bsu.rows())["ffn25 default (obs)"]).method == PruneConfig().method


def test_held_out_split_keeps_the_tail_out_of_the_calibration_text(ref_model_path, shared_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref_model_path)
    text = (shared_dir / "data" / "reference-train.txt").read_text()[:40000]
    before, held = bsu.held_out_split(tok, text, 4, 64)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert held.shape == (4, 64) and held.flatten().tolist() == ids[-256:]
    assert text.startswith(before)
    assert tok.decode(held.flatten()).strip() == text[len(before):].strip()  # the rest of the text is the tail
