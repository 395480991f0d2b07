"""``llmprune analyze``: the JSON's shape, the plot written (or skipped without matplotlib), the table without any
token text, the non-essential units equal to those the single-unit criterion scores 0, and every layer-alone loss
equal to one computed here by zeroing those units' inputs with hooks of the test's own."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from llmprune.cli import main

from tiny_models import tiny_causal_lm

ROW_FIELDS = {"layer", "heads", "neurons", "removable_heads", "removable_neurons", "heads_fraction",
              "neurons_fraction", "loss_heads", "loss_neurons", "loss_both", "delta_heads", "delta_neurons",
              "delta_both"}
#: what the table may contain besides its header lines: numbers, percentages, counts and signs
TABLE_ROW = re.compile(r"^[\s\d.%()/+\-–]+$")


def _analyze(model, calib, out, capsys, *extra):
    rc = main(["analyze", str(model), "--calib", str(calib), "--n-samples", "4", "--seq-len", "64", "--quiet",
               "--out", str(out), *extra])
    assert rc == 0
    return capsys.readouterr().out


def _check_table(stdout: str, n_layers: int) -> None:
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("non-essential = no label cluster") and lines[1].split()[0] == "layer"
    rows = lines[2 : 2 + n_layers]
    assert [r.split()[0] for r in rows] == [str(i) for i in range(n_layers)]
    assert all(TABLE_ROW.match(r) for r in rows), rows  # no token text, ever
    assert all(line.startswith(("wrote ", "no plot")) for line in lines[2 + n_layers :])


def test_analyze_on_the_reference_model(ref_model_path, shared_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    stdout = _analyze(ref_model_path, shared_dir / "data" / "reference-train.txt", out, capsys)
    _check_table(stdout, 6)
    data = json.loads((out / "analysis.json").read_text())
    assert {"model", "calibration", "seed", "dense_loss", "windows", "seq_len", "top_k", "threshold", "definition",
            "layers"} <= set(data)
    assert (data["windows"], data["seq_len"], data["top_k"], data["threshold"]) == (4, 64, 64, 0.3)
    assert data["model"] == "ref-llama-7m" and not str(data["calibration"]).startswith("/")
    assert len(data["layers"]) == 6
    for i, row in enumerate(data["layers"]):
        assert set(row) == ROW_FIELDS and row["layer"] == i and (row["heads"], row["neurons"]) == (8, 768)
        assert row["neurons_fraction"] == pytest.approx(len(row["removable_neurons"]) / 768)
        for kind in ("heads", "neurons", "both"):
            assert row[f"delta_{kind}"] == pytest.approx(row[f"loss_{kind}"] - data["dense_loss"])
    assert 0 < data["dense_loss"] < 10
    # the non-essential units are exactly those the single-unit criterion (clusters, snr) scores 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune import get_adapter
    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text
    from llmprune.calibration.single_unit import single_unit_statistics
    from llmprune.structured.criteria import get_criterion

    model = AutoModelForCausalLM.from_pretrained(ref_model_path).eval()
    tok = AutoTokenizer.from_pretrained(ref_model_path)
    windows = torch.cat(calibration_batches(tok, read_calibration_text(shared_dir / "data" / "reference-train.txt"),
                                            4, 64, 0))
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    stats = single_unit_statistics(model, adapter, [windows], {i: [l.self_attn.o_proj, l.mlp.down_proj]
                                                               for i, l in enumerate(layers)})
    criterion = get_criterion("single-unit")
    for row, layer in zip(data["layers"], layers):
        attn, ffn, s = adapter.attention(layer), adapter.ffn(layer), stats[row["layer"]].inputs
        for score in ("clusters", "snr"):
            zeros = criterion.fn(ffn.slots, ffn.num_neurons, s, single_unit_score=score) == 0
            assert torch.nonzero(zeros).flatten().tolist() == row["removable_neurons"]
            zeros = criterion.fn(attn.q_slots, attn.num_heads, s, single_unit_score=score) == 0
            assert torch.nonzero(zeros).flatten().tolist() == row["removable_heads"]
    assert any(row["removable_neurons"] for row in data["layers"])
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "analysis.png"]
    # the output folder is new unless --overwrite
    assert main(["analyze", str(ref_model_path), "--calib", str(shared_dir / "data" / "reference-train.txt"),
                 "--out", str(out), "--quiet"]) == 2


def test_plot_is_skipped_with_a_message_without_matplotlib(ref_model_path, shared_dir, tmp_path, capsys,
                                                           monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "analysis"
    stdout = _analyze(ref_model_path, shared_dir / "data" / "reference-train.txt", out, capsys)
    assert "no plot: matplotlib is not installed" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json"]


def _reference_loss(model, windows, masks) -> float:
    """Mean next-token NLL with the given input columns of the given modules zeroed (hooks of this test)."""
    def zeroer(cols):
        def hook(module, args):
            x = args[0].clone()
            x[..., cols] = 0
            return (x,)
        return hook

    handles = [m.register_forward_pre_hook(zeroer(cols)) for m, cols in masks if cols]
    try:
        with torch.no_grad():
            logits = model(input_ids=windows).logits[:, :-1].double()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_layer_alone_losses_equal_masking_with_hooks(model_type, ref_model_path, shared_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text

    folder = tmp_path / model_type
    tok = AutoTokenizer.from_pretrained(ref_model_path)
    tiny_causal_lm(model_type, vocab_size=tok.vocab_size).save_pretrained(folder)
    tok.save_pretrained(folder)
    calib = shared_dir / "data" / "reference-train.txt"
    out = tmp_path / "analysis"
    stdout = _analyze(folder, calib, out, capsys, "--threshold", "0.6")
    data = json.loads((out / "analysis.json").read_text())
    _check_table(stdout, 3)
    assert data["threshold"] == 0.6

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    windows = torch.cat(calibration_batches(tok, read_calibration_text(calib), 4, 64, 0))
    assert data["dense_loss"] == pytest.approx(_reference_loss(model, windows, []), rel=1e-5)
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for row, layer in zip(data["layers"], model.model.layers):
        heads = [c for h in row["removable_heads"] for c in range(h * d, (h + 1) * d)]
        neurons = row["removable_neurons"]
        o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
        for kind, masks in (("heads", [(o_proj, heads)]), ("neurons", [(down, neurons)]),
                            ("both", [(o_proj, heads), (down, neurons)])):
            assert row[f"loss_{kind}"] == pytest.approx(_reference_loss(model, windows, masks), rel=1e-5), kind
    # a stricter threshold than the seed's, so that both sets are non-empty somewhere (heads of a random model
    # almost always have a cluster at 0.3)
    assert any(row["removable_heads"] and row["removable_neurons"] for row in data["layers"])
