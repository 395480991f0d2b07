"""Hub loading works for real users: tested against a local Hub-compatible server (127.0.0.1 only).

huggingface_hub reads HF_ENDPOINT at import time, so the client runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


from hub_server import LocalHub


def _client_env(hub: LocalHub, home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", PYTHONPATH=os.pathsep.join(sys.path))
    return env


def test_prune_cli_loads_model_from_hub_id(tmp_path, ref_model_path):
    with LocalHub(tmp_path / "hub") as hub:
        hub.add_repo("acme/ref-llama-7m", ref_model_path)
        out = tmp_path / "pruned"
        code = ("import sys; from llmprune.cli import main; "
                f"sys.exit(main(['prune', 'acme/ref-llama-7m', '--ffn', '0.25', '--method', 'magnitude', "
                f"'--out', {str(out)!r}, '--quiet']))")
        proc = subprocess.run([sys.executable, "-c", code], env=_client_env(hub, tmp_path / "home"),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert any("/acme/ref-llama-7m/resolve/" in r for r in hub.state.requests)
    recipe = json.loads((out / "llmprune_recipe.json").read_text())
    assert recipe["source_model"] == "acme/ref-llama-7m"
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 576
    assert "base_model: acme/ref-llama-7m" in (out / "README.md").read_text()


def test_push_then_load_from_hub(tmp_path, ref_model_path):
    """Round trip through the Hub API: push a pruned folder, then prune-CLI users can load it by id."""
    from llmprune import PruneConfig, load_model, prune

    model, tok = load_model(ref_model_path)
    result = prune(model, PruneConfig(ffn=0.5, method="magnitude"), progress=False)
    folder = tmp_path / "pruned"
    result.save(folder, tokenizer=tok, source="acme/ref-llama-7m")
    with LocalHub(tmp_path / "hub") as hub:
        env = _client_env(hub, tmp_path / "home")
        env["HF_TOKEN"] = "hf_test"
        code = f"from llmprune.cli import main; raise SystemExit(main(['push', {str(folder)!r}, 'acme/small']))"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pushed = hub.state.repo_dir("acme/small")
        assert (pushed / "model.safetensors").is_file() and (pushed / "llmprune_plan.json").is_file()
        assert "pruned" in (pushed / "README.md").read_text()
        code = ("import torch; from llmprune import load_model; m, t = load_model('acme/small');"
                f"torch.save(m(t('a test', return_tensors='pt').input_ids).logits, {str(tmp_path / 'l.pt')!r})")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    ids = tok("a test", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "l.pt", weights_only=True), model(ids).logits, atol=0, rtol=0)


def test_push_refuses_broken_folder(tmp_path):
    from llmprune.checkpoint.errors import CheckpointError
    from llmprune.checkpoint.hub import push_to_hub

    (tmp_path / "config.json").write_text("{}")
    import pytest

    with pytest.raises(CheckpointError, match="no .safetensors"):
        push_to_hub(tmp_path, "acme/x")
