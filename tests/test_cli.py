"""The command line end to end: ``sparsify`` (weight and activation sparsity), ``prune``'s requested/achieved
table and rounding, shared flags on every subcommand, dataset names for ``--calib``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmprune.cli import build_parser, main
from llmprune.cli._registry import subcommands
from llmprune.sparsity import METHODS, apply_activation_sparsity, read_activation_thresholds


def _linear_weights(folder):
    """Decoder-block linear weights of a saved checkpoint (what sparsify targets by default)."""
    return {k: v for k, v in load_file(folder / "model.safetensors").items()
            if ".layers." in k and k.endswith("proj.weight")}


@pytest.mark.parametrize("method,pattern", [("magnitude", "2:4"), ("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_sparsify_exact_sparsity_and_identical_reload(tmp_path, ref_model_path, shared_dir, capsys, monkeypatch,
                                                      method, pattern):
    from transformers import AutoModelForCausalLM

    import llmprune.checkpoint.io

    ids = torch.randint(0, 8000, (2, 12), generator=torch.Generator().manual_seed(0))
    in_memory = {}
    save = llmprune.checkpoint.io.save_pruned

    def capture(model, *args, **kwargs):  # the CLI's in-memory result, just before its verified save
        with torch.no_grad():
            in_memory["logits"] = model(ids).logits
        return save(model, *args, **kwargs)

    monkeypatch.setattr(llmprune.checkpoint.io, "save_pruned", capture)
    out = tmp_path / "sparse"
    rc = main(["sparsify", str(ref_model_path), "--method", method, "--sparsity", "0.5", "--pattern", pattern,
               "--calib", str(shared_dir / "data" / "reference-train.txt"), "--n-samples", "8", "--seq-len", "64",
               "--out", str(out), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "weight sparsity (targets)" in table and "0.500" in table
    weights = _linear_weights(out)
    assert len(weights) == 6 * 7
    for name, w in weights.items():
        assert (w == 0).float().mean().item() == 0.5, name  # exactly half of every target layer
        if pattern == "2:4":
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
    recipe = json.loads((out / "llmprune_recipe.json").read_text())
    assert recipe["sparsity_config"]["method"] == method and recipe["weight_sparsity"] == 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # same attention kernel as the CLI
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, in_memory["logits"], atol=0, rtol=0)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert "sparsified" in (out / "README.md").read_text()


def test_sparsify_activation_thresholds_saved_and_applied(tmp_path, ref_model_path, shared_dir, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "act"
    rc = main(["sparsify", str(ref_model_path), "--sparsity", "0", "--activation-sparsity", "0.4",
               "--calib", str(shared_dir / "data" / "reference-train.txt"), "--n-samples", "8", "--seq-len", "64",
               "--out", str(out), "--quiet"])
    assert rc == 0
    assert "activation sparsity (inputs zeroed)" in capsys.readouterr().out
    thresholds = read_activation_thresholds(out)
    assert len(thresholds) == 6 * 7 and all(t > 0 for t in thresholds.values())
    recipe = json.loads((out / "llmprune_recipe.json").read_text())
    assert abs(recipe["activation_sparsity"]["achieved"] - 0.4) < 0.05
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 8000, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), apply_activation_sparsity(model, thresholds, track=True) as handle:
        model(ids)
    assert 0.25 < handle.overall() < 0.55


def test_sparsify_bad_input_is_clear_and_writes_nothing(tmp_path, ref_model_path, capsys):
    out = tmp_path / "out"
    assert main(["sparsify", str(ref_model_path), "--method", "wanda", "--out", str(out), "--quiet"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(["sparsify", str(ref_model_path), "--method", "magnitude", "--sparsity", "0.6", "--pattern", "2:4",
                 "--out", str(out), "--quiet"]) == 2
    assert "set sparsity=0.5" in capsys.readouterr().err
    assert main(["sparsify", str(ref_model_path), "--method", "magnitude", "--sparsity", "0", "--out", str(out)]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sparsify_help_lists_every_method():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["sparsify"]
    text = sub.format_help()
    for method in METHODS:
        assert method in text
    for flag in ("--n-samples", "--seq-len", "--seed", "--calib", "--activation-sparsity", "--no-verify", "--pattern"):
        assert flag in text


def test_every_subcommand_takes_quiet_and_verbose():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    for cmd in subcommands():
        text = choices[cmd.name].format_help()
        assert "--quiet" in text and "--verbose" in text, cmd.name


def test_prune_rounds_to_nearest_and_reports_requested_vs_achieved(tmp_path, ref_model_path, capsys):
    """8 heads in 4 KV groups of 2: --heads 0.3 asks for 2.4 heads; nearest whole group is 1 group = 0.25."""
    out = tmp_path / "p"
    assert main(["prune", str(ref_model_path), "--heads", "0.3", "--ffn", "0.2", "--method", "magnitude",
                 "--out", str(out), "--quiet", "--no-verify"]) == 0
    table = capsys.readouterr().out
    heads = next(line for line in table.splitlines() if line.startswith("attention heads"))
    assert heads.split()[2:5] == ["0.300", "0.250", "36"]
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 6
    assert json.loads((out / "llmprune_recipe.json").read_text())["config"]["rounding"] == "nearest"
    # --rounding error keeps the strict behaviour
    assert main(["prune", str(ref_model_path), "--heads", "0.3", "--method", "magnitude", "--rounding", "error",
                 "--out", str(tmp_path / "q"), "--quiet"]) == 2
    assert "Valid ratios" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prune", "sparsify"])
def test_calib_dataset_name_offline_is_one_clear_line(tmp_path, ref_model_path, capsys, monkeypatch, command):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    rc = main([command, str(ref_model_path), "--calib", "wikitext2", "--out", str(tmp_path / "o"), "--quiet",
               *(["--ffn", "0.25"] if command == "prune" else [])])
    err = capsys.readouterr().err
    assert rc == 2 and "'wikitext2' dataset (train split)" in err and "local text file" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_calib_dataset_name_uses_train_split(monkeypatch):
    """--calib wikitext2 draws from the train split (the test split is for perplexity)."""
    import datasets

    from llmprune.calibration.calibrate import read_calibration_text
    from llmprune.eval.perplexity import load_text

    calls = []

    def fake(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return {"text": [f"{split} row one", f"{split} row two"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert read_calibration_text("wikitext2") == "train row one\n\ntrain row two"
    assert load_text("wikitext2") == "test row one\n\ntest row two"
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
                     ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
