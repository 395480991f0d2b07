"""scripts/demo.sh outside this repository's surroundings: without ../shared it prunes the Hub fallback model
with WikiText-2 from ``datasets`` (here both served by the local Hub server), and offline it stops with one
clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hub_server import LocalHub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wikitext_repo(folder, shared_dir):
    """A parquet copy of WikiText-2's layout (README configs + one file per split) from the shared texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = folder / "wikitext-2-raw-v1"
    data.mkdir(parents=True)
    texts = {"train": (shared_dir / "data" / "reference-train.txt").read_text()[:200_000],
             "test": (shared_dir / "data" / "wikitext2-raw-test.txt").read_text()[:100_000]}
    texts["validation"] = texts["test"][:10_000]
    for split, text in texts.items():
        pq.write_table(pa.table({"text": text.splitlines(keepends=True)}), data / f"{split}-00000-of-00001.parquet")
    configs = "\n".join(f"  - split: {s}\n    path: wikitext-2-raw-v1/{s}-*" for s in texts)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n{configs}\n---\n")


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(LLMPRUNE_SHARED=str(tmp_path / "no-shared"), LLMPRUNE_DEMO_NO_INSTALL="1",
               HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), **extra)
    return env


def test_demo_without_shared_uses_hub_model_and_datasets(tmp_path, ref_model_path, shared_dir):
    with LocalHub(tmp_path / "hub") as hub:
        hub.add_repo("HuggingFaceTB/SmolLM2-135M", ref_model_path)  # stand-in weights under the fallback's name
        _wikitext_repo(tmp_path / "wikitext", shared_dir)
        hub.add_dataset("Salesforce/wikitext", tmp_path / "wikitext")
        out = tmp_path / "out"
        proc = subprocess.run(["bash", "scripts/demo.sh", "--n-samples", "8", "--ppl-max-tokens", "4000",
                               "--out", str(out), "--quiet"], cwd=REPO, env=_env(tmp_path, HF_ENDPOINT=hub.url),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        requests = "\n".join(hub.state.requests)
    assert "/HuggingFaceTB/SmolLM2-135M/resolve/" in requests
    assert "/datasets/Salesforce/wikitext/resolve/" in requests and "train-00000" in requests
    assert "perplexity (wikitext2, L=256)" in proc.stdout
    recipe = json.loads((out / "llmprune_recipe.json").read_text())
    assert recipe["source_model"] == "HuggingFaceTB/SmolLM2-135M" and recipe["calibration"] == "wikitext2"


def test_demo_offline_without_shared_is_one_clear_line(tmp_path):
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bash scripts/demo.sh PATH/TO/MODEL" in lines[0]
    assert proc.stdout == ""


def test_demo_with_local_model_offline_names_the_missing_text(tmp_path, ref_model_path):
    """A local MODEL but no shared text and no network: the calibration dataset error is one clear line."""
    proc = subprocess.run(["bash", "scripts/demo.sh", str(ref_model_path), "--out", str(tmp_path / "o")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "wikitext2" in lines[0] and "local text file" in lines[0]
    assert not (tmp_path / "o").exists()
