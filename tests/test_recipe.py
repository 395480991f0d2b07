"""Recipes (YAML/JSON run files, and every saved llmprune_recipe.json) reproduce their model; iterative
pruning reaches the same widths as one-shot."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmprune import PruneConfig, prune
from llmprune.cli import main
from llmprune.training.iterative import prune_iteratively, step_fraction
from llmprune.training.recipe import Recipe, read_recipe_file
from llmprune.training.recover import RecoveryConfig
from llmprune.arch.surgery import layer_widths

from tiny_models import tiny_causal_lm

TINY_RECOVERY = {"steps": 2, "batch_size": 2, "seq_len": 32, "eval_every": 2, "eval_windows": 2, "warmup_steps": 1}


def _same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_step_fractions_compose_to_the_target():
    for target in (0.25, 0.5, 0.75):
        for steps in (1, 2, 3, 4):
            left = 1.0
            for i in range(1, steps + 1):
                left *= 1 - step_fraction(target, steps, i)
            assert abs((1 - left) - target) < 1e-12


def test_iterative_reaches_the_one_shot_widths():
    kwargs = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=96)
    one = tiny_causal_lm("llama", **kwargs)
    prune(one, PruneConfig(heads=0.5, ffn=0.5, method="magnitude", attention_unit="group"), progress=False)
    it = tiny_causal_lm("llama", **kwargs)
    data = torch.randint(0, 128, (5000,), generator=torch.Generator().manual_seed(0))
    res = prune_iteratively(it, PruneConfig(heads=0.5, ffn=0.5, method="magnitude", attention_unit="group"), steps=2,
                            recovery=RecoveryConfig(steps=1, batch_size=2, seq_len=16, eval_every=1, eval_windows=2),
                            data=data, progress=False)
    assert layer_widths(res.model) == layer_widths(one)
    assert len(res.steps) == 2 and len(res.recoveries) == 1 and res.params_after == sum(
        p.numel() for p in {id(p): p for p in one.parameters()}.values())


def test_recipe_round_trips_and_rejects_bad_input(tmp_path):
    recipe = Recipe(model="m", prune={"heads": 0.25, "method": "magnitude"}, recover=TINY_RECOVERY, data="d.txt",
                    iterative_steps=2, recover_between=1, output="o")
    assert isinstance(recipe.prune, PruneConfig) and isinstance(recipe.recover, RecoveryConfig)
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    (tmp_path / "r.yaml").write_text("model: m\nprune: {heads: 0.25, method: magnitude}\noutput: o\n")
    assert read_recipe_file(tmp_path / "r.yaml").prune.heads == 0.25
    with pytest.raises(ValueError, match="unknown recipe field"):
        Recipe.from_dict({"model": "m", "prune": {}, "typo": 1})
    with pytest.raises(ValueError, match="at least one"):
        Recipe(model="m")
    with pytest.raises(ValueError, match="needs 'data'"):
        Recipe(model="m", recover={})
    old = {"llmprune_recipe_version": 1, "source_model": "m", "config": {"ffn": 0.5}, "calibration": "c.txt"}
    assert Recipe.from_saved(old) == Recipe(model="m", prune={"ffn": 0.5}, calibration="c.txt")


def test_run_recipe_then_rerun_its_saved_recipe_reproduces_the_model(tmp_path, ref_model_path, shared_dir, capsys):
    calib = str(shared_dir / "data" / "reference-train.txt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {ref_model_path}\ncalibration: {calib}\n"
        "prune: {heads: 0.25, ffn: 0.5, method: wanda, n_samples: 4, seq_len: 64}\n"
        f"recover: {json.dumps(TINY_RECOVERY)}\ndata: {calib}\nteacher: source\n"
        f"output: {tmp_path / 'first'}\n")
    assert main(["run", str(recipe), "--quiet"]) == 0
    assert "llmprune: ran" in capsys.readouterr().out
    first = tmp_path / "first"
    saved = json.loads((first / "llmprune_recipe.json").read_text())
    assert saved["run"]["teacher"] == "source" and saved["recovery"]["steps"] == 2
    assert saved["run"]["model"] == ref_model_path.name and saved["run"]["output"] is None  # no local paths
    again = ["--out", str(tmp_path / "again"), "--model", str(ref_model_path), "--calib", calib, "--data", calib]
    assert main(["run", str(first / "llmprune_recipe.json"), *again, "--quiet"]) == 0
    _same_weights(first, tmp_path / "again")


def test_prune_cli_iterative_and_its_recipe(tmp_path, ref_model_path, shared_dir):
    calib = str(shared_dir / "data" / "reference-train.txt")
    out = tmp_path / "it"
    assert main(["prune", str(ref_model_path), "--heads", "0.5", "--ffn", "0.5", "--method", "wanda", "--attention-unit", "group",
                 "--calib", calib, "--n-samples", "4", "--seq-len", "64", "--iterative-steps", "2",
                 "--recover-steps", "1", "--data", calib, "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["intermediate_size"] == 384
    run = json.loads((out / "llmprune_recipe.json").read_text())["run"]
    assert run["iterative_steps"] == 2 and run["recover_between"] == 1
    assert main(["run", str(out), "--out", str(tmp_path / "again"), "--model", str(ref_model_path), "--calib", calib,
                 "--data", calib, "--quiet"]) == 0
    _same_weights(out, tmp_path / "again")
    assert main(["prune", str(ref_model_path), "--ffn", "0.5", "--iterative-steps", "2", "--recover-steps", "1",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
