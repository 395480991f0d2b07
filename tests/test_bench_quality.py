"""scripts/bench_quality.py's own logic, without running a benchmark: the structured settings it asks the CLI
for, what it reads back from the CLI's tables, and the report it writes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_quality as bq  # noqa: E402

#: SmolLM2-135M's shapes (the issue-23 model), and a 2-group and an MQA variant
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64),
    "two-groups": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=64),
    "mqa": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=1, head_dim=64),
}


def _block_removed(cfg: dict, s: dict) -> float:
    """Independent count: q/o (and k/v for whole groups) per removed head, 3 matrices per FFN neuron."""
    h, hd, layers = cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"]
    heads, kv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter + 2 * h
    removed_heads = s["expected_heads_removed"] * heads * layers
    per_head = 2 * h * hd + (2 * h * hd * kv / heads if s["attention_unit"] == "group" else 0)
    removed = removed_heads * per_head + s["ffn"] * inter * layers * 3 * h
    return removed / (per_layer * layers)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("target", [0.1, 0.25, 0.33, 0.5])
def test_structured_setting_removes_the_target_share_of_block_parameters(tmp_path, shape, target):
    cfg = SHAPES[shape]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = bq.structured_setting(str(tmp_path), target)
    assert s["heads"] == round(target, 3)
    assert s["attention_unit"] in ("query", "group")
    assert _block_removed(cfg, s) == pytest.approx(target, abs=2e-3)


def test_smollm2_25_percent_is_the_documented_cli_default(tmp_path):
    """BENCHMARKS' 25% row runs `--heads 0.25 --ffn 0.27` on query heads (3 KV groups)."""
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["smollm2"]))
    s = bq.structured_setting(str(tmp_path), 0.25)
    assert (s["ffn"], s["attention_unit"]) == (0.27, "query")


def test_parse_cli_reads_the_prune_tables(tmp_path, ref_model_path, capsys):
    from llmprune.cli import main

    assert main(["prune", str(ref_model_path), "--heads", "0.25", "--ffn", "0.25", "--method", "magnitude",
                 "--out", str(tmp_path / "p")]) == 0
    res = bq._parse_cli(capsys.readouterr().out, {})
    assert (res["block_before"], res["block_after"]) == (4_721_664, 3_542_016)
    assert res["kept"] == pytest.approx(0.75, abs=1e-3)
    assert res["heads_removed"] == pytest.approx(0.25) and res["ffn_removed"] == pytest.approx(0.25)
    assert res["recipe"].startswith("magnitude")


def test_report_and_plot_from_rows(tmp_path):
    proto = {"preset": "ref", "model": "m/SmolLM2", "calib": "reference-train.txt", "ppl": "w.txt", "n_samples": 64,
             "seq_len": 512, "seed": 0, "ppl_seq_len": 512, "max_tokens": 20000, "tasks": ["piqa"], "limit": 100,
             "threads": 1}
    rows = [
        {"kind": "dense", "label": "dense", "method": "dense", "variant": "", "setting": "", "ppl": 28.77, "kept": 1.0,
         "seconds": 0.0, "peak_rss_mb": 900, "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.65}}},
        {"kind": "structured", "label": "structured 25%", "method": "default (CLI)", "variant": "obs+fisher",
         "setting": "25%", "config": {"heads": 0.25, "ffn": 0.27}, "calib_windows": [128, 1024], "heads_removed": 0.1,
         "ffn_removed": 0.3, "kept": 0.75, "ppl": 48.56, "seconds": 3300.0, "peak_rss_mb": 4154,
         "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.62}}},
        {"kind": "sparsity", "label": "alps 50%", "method": "alps", "variant": "llmprune", "setting": "50%",
         "kept": 0.5, "ppl": 50.4, "seconds": 1000.0, "peak_rss_mb": 2000, "tasks": {}},
        {"kind": "peer", "label": "llm-compressor sparsegpt 50%", "method": "sparsegpt", "variant": "llm-compressor",
         "setting": "50%", "error": "boom"},
    ]
    bq._write(tmp_path, proto, "test machine", rows)
    md = (tmp_path / "results.md").read_text()
    assert "| structured 25% | 0.25 | 0.27 | 128x1024 | 0.100 | 0.300 | 25.0% | 48.56 | 0.620 |" in md
    assert "| alps | llmprune | 50% | 0.500 | 50.40 | – |" in md and " failed |" in md
    assert "Dense: 28.77." in md
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["ppl"] == 48.56
    assert (tmp_path / "ppl_vs_kept.png").stat().st_size > 1000


def test_only_filters_rows_by_kind_method_label_or_setting():
    args = argparse.Namespace(model=None, targets=[], legacy=False, only="alps,structured")
    labels = [r["label"] for r in bq._rows(args)]
    assert labels == ["alps 2:4", "alps 70%", "alps 50%"]
