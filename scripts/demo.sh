#!/usr/bin/env bash
# One command: set up (CPU torch first, then llmprune) and run the default job: prune 25% of the attention
# heads and 25% of the FFN neurons with the default recipe (method obs: greedy structured optimal brain
# surgeon with the optimal refit of o_proj/down_proj; allocation fisher: per-layer widths where the estimated
# loss increase is lowest; attention unit auto), save the verified result, and print the requested/achieved
# and before/after tables (params, size, perplexity).
#
#   bash scripts/demo.sh [MODEL] [more `llmprune prune` flags]
#
# MODEL defaults to ../shared/models/ref-llama-7m when present (calibration and perplexity text from
# ../shared/data, fully offline), else to the Hub model HuggingFaceTB/SmolLM2-135M with WikiText-2 from
# `datasets` (train split to calibrate, test split for perplexity). LLMPRUNE_SHARED moves ../shared;
# LLMPRUNE_DEMO_NO_INSTALL=1 skips the pip step.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLMPRUNE_SHARED:-../shared}"
HUB_MODEL="HuggingFaceTB/SmolLM2-135M"
if [ -z "${LLMPRUNE_DEMO_NO_INSTALL:-}" ]; then
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e .
fi
MODEL=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then MODEL="$1"; shift; fi
if [ -z "$MODEL" ] && [ -d "$SHARED/models/ref-llama-7m" ]; then MODEL="$SHARED/models/ref-llama-7m"; fi
export TOKENIZERS_PARALLELISM=false
if [ -f "$SHARED/data/reference-train.txt" ] && [ -f "$SHARED/data/wikitext2-raw-test.txt" ]; then
  CALIB="$SHARED/data/reference-train.txt"; PPL="$SHARED/data/wikitext2-raw-test.txt"
else
  CALIB="wikitext2"; PPL="wikitext2"
fi
if [ -z "$MODEL" ]; then
  MODEL="$HUB_MODEL"
  if ! python -c "import sys; from huggingface_hub import hf_hub_download; hf_hub_download(sys.argv[1], 'config.json')" \
      "$MODEL" >/dev/null 2>&1; then
    echo "demo: $SHARED/models/ref-llama-7m is not here and $MODEL cannot be downloaded (offline?); pass a local model folder: bash scripts/demo.sh PATH/TO/MODEL" >&2
    exit 2
  fi
fi
if [ -d "$MODEL" ] && [ "$CALIB" != "wikitext2" ]; then  # everything is local: never touch the network
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
OUT="runs/$(basename "$MODEL")-pruned"
exec python -m llmprune prune "$MODEL" \
  --heads 0.25 --ffn 0.25 \
  --calib "$CALIB" \
  --ppl "$PPL" --ppl-seq-len 256 --ppl-max-tokens 60000 --ppl-keep-tail \
  --out "$OUT" --overwrite "$@"
