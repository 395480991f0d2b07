"""Shared fixtures: offline environment, the shared folder, and tiny random models of every family."""

from __future__ import annotations

import os
from pathlib import Path

# Offline before transformers/datasets/huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU; on a GPU, compiled
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared")).resolve()
REF_MODEL = SHARED / "models" / "ref-llama-7m"
WIKITEXT = SHARED / "data" / "wikitext2-raw-test.txt"
CALIB_TEXT = SHARED / "data" / "reference-train.txt"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared folder not found at {SHARED} (set LLMPRUNE_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def ref_model_path(shared_dir) -> Path:
    return REF_MODEL


@pytest.fixture()
def ref_model(ref_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ref_model_path).eval()
    tok = AutoTokenizer.from_pretrained(ref_model_path)
    return model, tok
