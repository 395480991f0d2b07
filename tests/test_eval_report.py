"""Efficiency fields, the side-by-side report, api.evaluate and the CLI on a tiny model."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from llmprune.eval.efficiency import count_parameters, macs_per_token, measure_speed, peak_memory, size_on_disk
from llmprune.eval.report import Report, relative_change

SHARED = Path(os.environ.get("LLMPRUNE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
MODEL = SHARED / "models" / "ref-llama-7m"
WIKI = SHARED / "data" / "wikitext2-raw-test.txt"
needs_shared = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared (LLMPRUNE_SHARED) not available")


def tiny_llama(intermediate: int = 64, vocab: int = 8192):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_parameter_counts_and_macs():
    model = tiny_llama()
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert sum(counts["by_type"].values()) == counts["total"] == sum(counts["by_role"].values())
    assert counts["by_role"]["embedding"] == counts["by_role"]["lm_head"] == 8192 * 32
    # per layer: q 32x32, k/v 32x16, o 32x32, mlp 3 * 32x64; lm_head 32x8192; attention 2*32*(L+1)/2
    linear = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64) + 32 * 8192
    assert macs_per_token(model, 15) == linear + 2 * 2 * 32 * 8
    assert macs_per_token(tiny_llama(intermediate=32), 15) < macs_per_token(model, 15)


def test_size_on_disk(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("x" * 100)
    weights = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert size_on_disk(tmp_path) == weights > 0
    with pytest.raises(FileNotFoundError):
        size_on_disk(tmp_path / "missing")


def test_speed_and_memory_return_sane_fields():
    model = tiny_llama()
    speed = measure_speed(model, 8192, prompt_len=8, new_tokens=3, batch_sizes=(1, 2), warmup=1, repeats=2)
    assert set(speed["batches"]) == {1, 2}
    for values in speed["batches"].values():
        assert values["prefill_tokens_per_s"] > 0 and values["decode_tokens_per_s"] > 0
        assert values["decode_ms_per_step"] > 0
    mem = peak_memory(model, 8192, seq_len=16)
    assert mem["weights_bytes"] >= sum(p.numel() * 4 for p in model.parameters())  # + buffers
    assert mem["peak_bytes"] > 0 and mem["kind"] in ("process_rss", "cuda_max_allocated")


def test_report_table_relative_change_and_files(tmp_path):
    rep = Report({
        "dense": {"perplexity": {"ppl": 20.0}, "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.5}},
                  "params": {"total": 1000}, "size_bytes": 4_000_000},
        "pruned": {"perplexity": {"ppl": 25.0}, "tasks": {"piqa": {"acc": 0.55, "acc_norm": 0.5}},
                   "params": {"total": 500}, "size_bytes": 2_000_000},
    })
    table = {row[0]: row for row in rep.table()}
    assert table["ppl"][2] == "25 (+25.0%)" and table["params"][2] == "500 (-50.0%)"
    assert "piqa acc" in table and "size MB" in table
    assert relative_change(0, 1) is None and relative_change(2.0, 1.0) == -0.5
    paths = rep.save(tmp_path / "report")
    assert json.loads(paths["json"].read_text())["results"]["pruned"]["params"]["total"] == 500
    assert "| ppl | 20 | 25 (+25.0%) |" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


@needs_shared
def test_cli_end_to_end_dense_vs_smaller(tmp_path, capsys):
    from transformers import AutoTokenizer

    from llmprune.eval import cli

    tok = AutoTokenizer.from_pretrained(MODEL)
    for name, ffn in (("dense", 64), ("pruned", 32)):
        tiny_llama(ffn).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    text = tmp_path / "text.txt"
    text.write_text(WIKI.read_text(encoding="utf-8")[:20_000])
    parser = cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path / "dense"), str(tmp_path / "pruned"), "--ppl", str(text),
                              "--seq-len", "64", "--max-tokens", "640", "--speed-batch-sizes", "1",
                              "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and "params" in printed and "%" in printed
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    dense, pruned = data["results"]["dense"], data["results"]["pruned"]
    assert dense["perplexity"]["n_windows"] == 10 and dense["perplexity"]["seq_len"] == 64
    assert pruned["params"]["total"] < dense["params"]["total"]
    assert pruned["size_bytes"] < dense["size_bytes"]
    assert (tmp_path / "out" / "report.png").is_file() and (tmp_path / "out" / "report.md").is_file()


def test_cli_main_reports_missing_inputs(tmp_path, capsys):
    from llmprune.eval import cli

    assert cli.main([str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
