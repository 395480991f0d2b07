"""Perplexity on the windows of ``llmprune eval`` (eval/perplexity.py: the text tokenised once with special tokens,
first 20,000 ids, non-overlapping 512-token windows, tail dropped), each window fed with ``<bos>`` in front (not
scored), so the same 19,929 targets are scored. Gemma needs ``<bos>`` at the start of every sequence; the eval
protocol gives it only to the first window.

    python bench/real_family2/ppl_bos_per_window.py MODEL_FOLDER [TEXT]
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for eval/
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmprune  # noqa: F401  (registers the per-layer classes of pruned outputs)
from eval.perplexity import tokenize_text, windows

torch.set_num_threads(1)
folder = sys.argv[1]
text = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/wikitext2-raw-test.txt").read_text()
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = tokenize_text(tok, text, max_tokens=20000)
plan = windows(len(ids), 512)
nll, n = 0.0, 0
for start, end, _ in plan:
    w = ids[start:end]
    off = 0 if w[0].item() == tok.bos_token_id else 1
    if off:
        w = torch.cat([torch.tensor([tok.bos_token_id]), w])
    with torch.no_grad():
        hidden = model.model(w[None]).last_hidden_state[0]
        logits = model.lm_head(hidden[off:-1])  # predicts w[off + 1:], the evaluator's targets
        lp = torch.log_softmax(logits.float(), -1).gather(1, w[off + 1:, None])
    nll -= lp.sum().item()
    n += lp.numel()
print(f"windows {len(plan)} targets {n} ppl {math.exp(nll / n):.2f}")
