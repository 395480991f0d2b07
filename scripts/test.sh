#!/usr/bin/env bash
# Sets up (CPU torch first, then the package with its dev extras) and runs the test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
# [llamacpp] builds llama.cpp from source the first time (cmake, g++; pip caches the wheel): the GGUF export tests
# run the exported files in it
python -m pip install -q -e ".[dev,llamacpp]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Triton kernels run in its CPU interpreter unless a GPU is present.
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export TRITON_INTERPRET=1
# One worker per core (pytest-xdist), one torch thread each: the suite is many small CPU-bound tests
# (fresh clone, new venv, 2 cores: 8 min 43 s on 2 workers beside a 1-thread benchmark; 7 min 7 s alone, existing env).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n "${LLMPRUNE_TEST_WORKERS:-auto}" "$@"
