#!/usr/bin/env bash
# One command: set up (CPU torch first, then llmprune) and run the default job on the shipped reference
# model: prune 25% of its decoder-block parameters (25% of heads as whole GQA groups + 25% of FFN neurons,
# activation-aware), save it, and print the before/after table (params, size on disk, WikiText-2 perplexity).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLMPRUNE_SHARED:-../shared}"
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
llmprune prune "$SHARED/models/ref-llama-7m" \
  --heads 0.25 --ffn 0.25 --method wanda \
  --calib "$SHARED/data/reference-train.txt" --n-samples 64 --seq-len 256 \
  --ppl "$SHARED/data/wikitext2-raw-test.txt" --ppl-seq-len 256 --ppl-max-tokens 60000 --ppl-keep-tail \
  --out runs/ref-llama-7m-pruned --overwrite "$@"
