"""Perplexity against a plain cross-entropy loop and the reference model's published value."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmprune.eval.perplexity import PerplexityResult, load_text, perplexity, tokenize_text, windows

SHARED = Path(os.environ.get("LLMPRUNE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
MODEL = SHARED / "models" / "ref-llama-7m"
WIKI = SHARED / "data" / "wikitext2-raw-test.txt"
needs_shared = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared (LLMPRUNE_SHARED) not available")


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL).eval(), AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def wiki_text() -> str:
    return load_text(WIKI)


def plain_loop_ppl(model, ids: torch.Tensor, seq_len: int, bos: int | None = None) -> float:
    """Independent reference: one window at a time, HF-style shifted cross-entropy; with ``bos``, every window
    that does not start the text is read after that token (context only)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            x = ids[start : start + seq_len][None]
            lead = int(bos is not None and start > 0)
            if lead:
                x = torch.cat([torch.tensor([[bos]]), x], dim=1)
            logits = model(x).logits[0, lead:-1].float()
            nll += F.cross_entropy(logits, x[0, lead + 1:], reduction="sum").item()
            count += seq_len - 1
    return math.exp(nll / count)


def plain_sliding_ppl(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Hugging Face perplexity-guide loop (labels -100 on context tokens), except that the
    last window keeps a full ``seq_len`` of context (begin = end - seq_len)."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for step in range(0, ids.numel(), stride):
            end = min(step + seq_len, ids.numel())
            begin = max(0, end - seq_len)
            trg = end - prev_end
            x = ids[begin:end][None]
            labels = x.clone()
            labels[:, :-trg] = -100
            logits = model(x).logits[0, :-1].float()
            tgt = labels[0, 1:]
            nll += F.cross_entropy(logits, tgt, reduction="sum", ignore_index=-100).item()
            count += int((tgt != -100).sum())
            prev_end = end
            if end == ids.numel():
                break
    return math.exp(nll / count), count


@needs_shared
def test_matches_plain_loop(ref, wiki_text):
    model, tok = ref
    got = perplexity(model, tok, wiki_text, seq_len=128, max_tokens=2000, batch_size=5, progress=False)
    ids = tokenize_text(tok, wiki_text, 2000)
    assert ids[0] == tok.bos_token_id  # the reference tokenizer starts every text with BOS: so does every window
    want = plain_loop_ppl(model, ids, 128, bos=tok.bos_token_id)
    assert got.n_windows == 2000 // 128 and got.n_tokens == got.n_windows * 127
    assert got.ppl == pytest.approx(want, rel=1e-4)
    assert isinstance(got, PerplexityResult) and got.to_dict()["seq_len"] == 128
    papers = perplexity(model, tok, wiki_text, seq_len=128, max_tokens=2000, batch_size=5, progress=False,
                        bos_every_window=False)  # the papers' protocol: the text's one BOS only
    assert papers.ppl == pytest.approx(plain_loop_ppl(model, ids, 128), rel=1e-4) and papers.ppl != got.ppl
    assert papers.n_tokens == got.n_tokens


def test_windows_get_a_bos_only_from_tokenizers_that_start_texts_with_one():
    from llmprune.calibration.calibrate import calibration_batches, leading_bos

    class Tok:  # whitespace words; ``bos`` None: adds nothing (SmolLM2, GPT-2, Qwen)
        def __init__(self, bos):
            self.bos_token_id = bos

        def __call__(self, text, add_special_tokens=True, **kw):
            ids = [10 + len(w) for w in text.split()]
            return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None
                                  else []) + ids}

    assert leading_bos(Tok(1)) == 1 and leading_bos(Tok(None)) is None
    text = " ".join("w" * (1 + i % 7) for i in range(400))
    plain = torch.cat(calibration_batches(Tok(None), text, n_samples=4, seq_len=16, batch_size=2))
    with_bos = torch.cat(calibration_batches(Tok(1), text, n_samples=4, seq_len=16, batch_size=2))
    assert plain.shape == with_bos.shape == (4, 16)
    assert (with_bos[:, 0] == 1).all() and torch.equal(with_bos[:, 1:], plain[:, :-1])  # same windows, BOS first


@needs_shared
def test_sliding_matches_hf_guide_loop(ref, wiki_text):
    model, tok = ref
    got = perplexity(model, tok, wiki_text, seq_len=128, stride=48, max_tokens=600, progress=False,
                     bos_every_window=False)
    want, count = plain_sliding_ppl(model, tokenize_text(tok, wiki_text, 600), 128, 48)
    assert got.n_tokens == count == 599  # every token but the first scored once
    assert got.ppl == pytest.approx(want, rel=1e-4)


@needs_shared
def test_reference_value_first_60k_tokens_seq256(ref, wiki_text):
    """TRAINING.json: 287.959. Text = the file read with universal newlines, tokenised once
    with BOS, first 60,000 tokens, 256-token non-overlapping windows; the published value
    also scores the final 96-token partial window (drop_last=False): 287.915."""
    model, tok = ref
    with_tail = perplexity(model, tok, wiki_text, seq_len=256, max_tokens=60_000, drop_last=False, progress=False,
                           bos_every_window=False)
    assert with_tail.ppl == pytest.approx(287.96, abs=0.05)
    assert with_tail.n_windows == 235 and with_tail.n_input_tokens == 60_000


@needs_shared
def test_half_precision_close_to_fp32(ref, wiki_text):
    model, tok = ref
    fp32 = perplexity(model, tok, wiki_text, seq_len=32, max_tokens=320, progress=False)
    bf16 = perplexity(model.to(torch.bfloat16), tok, wiki_text, seq_len=32, max_tokens=320, progress=False)
    model.to(torch.float32)
    assert bf16.ppl == pytest.approx(fp32.ppl, rel=0.05)


def test_window_plans():
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 5)]
    assert windows(10, 4, drop_last=False)[-1] == (8, 10, 9)
    plan = windows(100, 16, stride=5)
    scored = [p for s, e, f in plan for p in range(f, e)]
    assert scored == list(range(1, 100))
    assert all(e - s <= 16 for s, e, _ in plan)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, stride=5)


def test_missing_file_and_empty_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(empty))
    with pytest.raises(FileNotFoundError, match="directory"):
        load_text(str(tmp_path))


def test_dataset_alias_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="wikitext2"):
        load_text("wikitext2")


@needs_shared
def test_bad_inputs(ref):
    model, tok = ref
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "Just a few words .", seq_len=256, progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, "   ", seq_len=16, progress=False)
    with pytest.raises(ValueError, match="context length"):
        perplexity(model, tok, "a b c " * 100, seq_len=4096, progress=False)


@needs_shared
def test_model_tokenizer_mismatch(ref):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = ref
    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(ValueError, match="mismatch"):
        perplexity(small, tok, "hello world " * 50, seq_len=16, progress=False)
