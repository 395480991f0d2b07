"""Recovery training: LoRA merged into a plain checkpoint (loads without peft, and without llmprune where the
config is standard), distillation, best held-out checkpoint, kill + resume == uninterrupted, the CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.checkpoint.io import save_pruned
from llmprune.training.recover import STATE_DIR_SUFFIX, RecoveryConfig, recover, training_windows

from tiny_models import tiny_causal_lm

DATA = torch.randint(0, 128, (30000,), generator=torch.Generator().manual_seed(0))
SMALL = dict(steps=6, batch_size=2, seq_len=16, eval_every=3, eval_windows=4, warmup_steps=2)


def _pruned(model_type="qwen2", allocation="uniform"):
    model = tiny_causal_lm(model_type)
    prune(model, PruneConfig(heads=0.5, ffn=0.25, method="magnitude", allocation=allocation), progress=False)
    return model


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_lora_output_reloads_without_peft_or_llmprune(tmp_path, allocation):
    model = _pruned(allocation=allocation)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    result = recover(model, RecoveryConfig(**SMALL), data=DATA, progress=False)
    merged = result.model
    assert type(merged).__name__.endswith("Qwen2ForCausalLM")
    assert {n: p.shape for n, p in merged.named_parameters()} == shapes  # adapters merged, shapes kept
    out = save_pruned(merged, tmp_path / "rec", extra={"recovery": result.config.to_dict()})
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = merged(ids).logits
    standard = json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert standard == (allocation == "uniform")
    code = (
        "import sys, torch\n"
        + ("" if standard else "import llmprune\n")
        + "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, attn_implementation='eager').eval()\n"
        "assert 'peft' not in sys.modules\n"
        + ("assert 'llmprune' not in sys.modules\n" if standard else "")
        + f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        f"torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=0, rtol=0)


def test_training_lowers_loss_and_keeps_the_best_checkpoint():
    model = _pruned()
    cfg = RecoveryConfig(steps=12, batch_size=4, seq_len=16, eval_every=4, eval_windows=4, lr=5e-3, warmup_steps=2)
    result = recover(model, cfg, data=DATA, progress=False, teacher=tiny_causal_lm("qwen2"))
    evals = [r for r in result.history if "eval_ppl" in r]
    assert len(evals) == 3 and result.best_eval_ppl == min(r["eval_ppl"] for r in evals)
    assert evals[-1]["eval_ppl"] < evals[0]["eval_ppl"] * 1.5  # trains without diverging
    assert result.tokens == 12 * 4 * 16


def test_training_windows_are_a_pure_function_of_step():
    a = training_windows(DATA, 5, 3, 16, seed=1)
    assert torch.equal(a, training_windows(DATA, 5, 3, 16, seed=1))
    assert not torch.equal(a, training_windows(DATA, 6, 3, 16, seed=1))
    assert not torch.equal(a, training_windows(DATA, 5, 3, 16, seed=1, process=1))


@pytest.mark.parametrize("full", [False, True])
def test_kill_and_resume_equals_uninterrupted(tmp_path, full):
    start = _pruned()
    # evaluated only at the end, checkpointed every 2 steps: the result is the resumed training's last weights
    cfg = RecoveryConfig(**{**SMALL, "steps": 8, "eval_every": 8, "save_every": 2}, full=full, lr=3e-3)
    straight = recover(copy.deepcopy(start), cfg, data=DATA, progress=False).model
    state = tmp_path / ("out" + STATE_DIR_SUFFIX)
    recover(copy.deepcopy(start), cfg, data=DATA, progress=False, state_dir=state, stop_after=5)  # "killed"
    assert (state / "state.json").is_file()
    assert json.loads((state / "state.json").read_text())["step"] == 4  # last checkpoint before the kill
    resumed = recover(copy.deepcopy(start), cfg, data=DATA, progress=False, state_dir=state, resume=True).model
    changed = False
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
        changed |= not torch.equal(a, start.state_dict()[name])
    assert changed


def test_bad_recovery_input_is_clear():
    with pytest.raises(ValueError, match="steps"):
        RecoveryConfig(steps=0)
    with pytest.raises(ValueError, match="training data"):
        recover(_pruned(), RecoveryConfig(**SMALL), progress=False)
    with pytest.raises(ValueError, match="tokens"):
        recover(_pruned(), RecoveryConfig(**SMALL), data=DATA[:50], progress=False)
    assert RecoveryConfig.from_dict(RecoveryConfig(lora_targets="q_proj,v_proj").to_dict()).lora_targets == \
        ["q_proj", "v_proj"]


def test_cli_recover_end_to_end(tmp_path, ref_model_path, shared_dir, capsys):
    from llmprune.cli import main

    pruned = tmp_path / "pruned"
    assert main(["prune", str(ref_model_path), "--heads", "0.25", "--ffn", "0.5", "--method", "magnitude",
                 "--out", str(pruned), "--quiet"]) == 0
    out = tmp_path / "rec"
    args = ["recover", str(pruned), "--data", str(shared_dir / "data" / "reference-train.txt"), "--steps", "4",
            "--batch-size", "2", "--seq-len", "64", "--eval-every", "2", "--eval-windows", "4",
            "--teacher", str(ref_model_path), "--out", str(out), "--quiet"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "held-out perplexity (best step)" in table and "training tokens" in table
    recipe = json.loads((out / "llmprune_recipe.json").read_text())
    assert recipe["recovery"]["steps"] == 4 and recipe["config"]["ffn"] == 0.5 and recipe["teacher"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"  # 6 of 8 heads: the twin
    assert not (tmp_path / ("rec" + STATE_DIR_SUFFIX)).exists()
    assert main(args) == 2  # existing output refused
    (tmp_path / ("rec2" + STATE_DIR_SUFFIX)).mkdir()
    assert main(args[:-3] + ["--out", str(tmp_path / "rec2")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_killed_run_resumes_to_the_uninterrupted_result(tmp_path, ref_model_path, shared_dir):
    """A real kill (SIGKILL of the process after a checkpoint), then --resume: same weights as a straight run."""
    import signal
    import time

    from safetensors.torch import load_file

    calib = str(shared_dir / "data" / "reference-train.txt")

    def cmd(out, *extra):
        return [sys.executable, "-m", "llmprune", "recover", str(ref_model_path), "--data", calib, "--steps", "24",
                "--batch-size", "2", "--seq-len", "32", "--eval-every", "4", "--eval-windows", "2", "--lora-r", "4",
                "--out", str(out), "--quiet", *extra]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd(tmp_path / "straight"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    state = tmp_path / ("killed" + STATE_DIR_SUFFIX)
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (state / "state.json").is_file():
            try:
                step = json.loads((state / "state.json").read_text())["step"]
            except (ValueError, OSError):
                step = 0
            if step >= 8:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait()
    if killed_at is None:
        pytest.skip("the run finished before it could be killed (machine too fast for this timing)")
    assert not out.exists() and 8 <= killed_at < 24
    assert subprocess.run(cmd(out), env=env, capture_output=True).returncode == 2  # refuses without --resume
    subprocess.run(cmd(out, "--resume"), check=True, env=env, capture_output=True)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert not state.exists()
