"""Vocabulary pruning (issue 38): ``PruneConfig(vocab=...)`` / ``llmprune prune --vocab``.

The invariant: for a text whose original tokenization uses kept tokens only, the rewritten tokenizer gives the same
tokens (renumbered) and the pruned model's next-token distribution is the original's restricted to the kept tokens
and renormalised. It is checked against a reference written here (the original model's logits, kept columns,
log-softmax) on tiny random models of several families, tied and untied, saved and reloaded with ``save_pretrained``,
with the reference model's byte-level BPE tokenizer and a SentencePiece-style byte-fallback BPE built here with the
``tokenizers`` library. Any text still round-trips: a few MB of generated text in several scripts, code, emoji and
whitespace runs. The saved folder reloads in a fresh process with plain transformers, and (with llama-cpp-python)
the GGUF export tokenizes and computes like transformers.
"""

from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmprune import PruneConfig, prune
from llmprune.calibration.calibrate import CalibrationError
from llmprune.checkpoint.io import read_plan, read_recipe
from llmprune.checkpoint.tokenizer_prune import (TokenizerPruneError, merge_closure, prune_tokenizer,
                                                 tokenizer_spec, tokenizer_vocab)
from llmprune.cli import main
from llmprune.core.config import RatioError
from llmprune.eval.perplexity import perplexity, token_bytes, windows
from llmprune.structured.apply import apply_plan
from llmprune.structured.vocab import prune_vocab

from conftest import CALIB_TEXT, REF_MODEL
from tiny_models import tiny_causal_lm

#: family key -> (model_type, tied LM head)
FAMILIES = {"llama-tied": ("llama", True), "llama-untied": ("llama", False), "qwen2-untied": ("qwen2", False),
            "gemma2-tied": ("gemma2", True), "gpt2-tied": ("gpt2", True)}


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ref_tok():
    if not REF_MODEL.is_dir():
        pytest.skip(f"reference model not found at {REF_MODEL}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REF_MODEL)


@pytest.fixture(scope="module")
def domain_text() -> str:
    if not CALIB_TEXT.is_file():
        pytest.skip(f"reference text not found at {CALIB_TEXT}")
    return CALIB_TEXT.read_text(encoding="utf-8")[:20_000]


@pytest.fixture(scope="module")
def fallback_tok(tmp_path_factory, domain_text):
    """A Llama-2 / Gemma-style BPE: Metaspace words, ``byte_fallback`` with the 256 ``<0xXX>`` tokens (ids 3-258),
    a BOS-adding post-processor; trained here on the reference text plus a little Cyrillic and CJK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=120,
                                  show_progress=False)
    extra = "Съешь же ещё этих мягких французских булок да выпей чаю. 東京 北京 大阪 日本語 中文 " * 20
    base.train_from_iterator(domain_text.splitlines() + [extra], trainer)
    spec = json.loads(base.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    spec["added_tokens"] = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                 special=True) for i, c in enumerate(("<unk>", "<s>", "</s>"))]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("fallback-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_saved(family: str, source_tok, folder: Path):
    """A tiny random model of ``family`` and its tokenizer as users have them: one saved folder holding ``source_tok``'s
    files, both loaded back from it (``AutoTokenizer`` picks some tokenizer classes by the model type: Qwen2's adds
    its end-of-text token)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type, tied = FAMILIES[family]
    source_tok.save_pretrained(folder)
    AutoConfig.for_model(model_type).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ctx = {"n_positions": 256} if model_type == "gpt2" else {"max_position_embeddings": 256}
    model = tiny_causal_lm(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, tie_word_embeddings=tied, **ctx)
    with torch.no_grad():  # peakier next-token distributions than the 0.02 init
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def restricted_reference(original, old_ids: list[int], kept: list[int]) -> torch.Tensor:
    """The invariant's reference: the original model's log-probabilities over the kept tokens only."""
    with torch.no_grad():
        logits = original(torch.tensor([old_ids])).logits[0].double()
    return F.log_softmax(logits[:, torch.tensor(kept)], dim=-1)


def kept_only_text(tok, text: str, kept: list[int], max_tokens: int = 200) -> tuple[str, list[int]]:
    """A prefix of ``text`` whose original tokenization uses kept tokens only (checked), with its ids."""
    prefix = text[:600]
    ids = tok(prefix)["input_ids"][:max_tokens]
    prefix = tok.decode(ids, skip_special_tokens=True)
    ids = tok(prefix)["input_ids"]
    assert set(ids) <= set(kept), "the check text must use kept tokens only"
    return prefix, ids


def mixed_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic text in many scripts (Latin, Cyrillic, Greek, CJK, kana, Arabic, Devanagari, Hangul), code,
    emoji (ZWJ sequences, flags, skin tones), combining marks and runs of every kind of whitespace."""
    rng = random.Random(seed)
    ranges = [(0x61, 0x7A), (0x41, 0x5A), (0xC0, 0x17F), (0x400, 0x4FF), (0x391, 0x3C9), (0x4E00, 0x9FFF),
              (0x3040, 0x30FF), (0x600, 0x6FF), (0x900, 0x97F), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F), (0x30, 0x39)]
    code = ["def f(x):\n    return x ** 2  # ok\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
            "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id = 42;", "λx. x ∘ f → ∞ ≠ 0", "{'k': [1, 2.5e-3]}"]
    special = ["👩‍💻", "🇫🇷", "👍🏽", "❤️", "e\u0301", "ﬁ", "\u200b", "\ufeff", "Å", "ß", "İ", "\U0010fffd"]
    spaces = [" ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \t ", "\u3000", "\u00a0", "\n   ", "\x0b", ""]
    words = []
    for _ in range(4000):
        lo, hi = rng.choice(ranges)
        words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 9))))
    words += code + special
    out, total = [], 0
    while total < n_chars:
        w = rng.choice(words) + rng.choice(spaces)
        out.append(w)
        total += len(w)
    return "".join(out)


# --------------------------------------------------------------------------------------------------- invariant


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_distribution_is_the_restricted_original(family, tmp_path, ref_tok, domain_text):
    model, tok = tiny_saved(family, ref_tok, tmp_path / "src")
    original = copy.deepcopy(model)
    tied = FAMILIES[family][1]
    result = prune(model, PruneConfig(vocab=0.6), tokenizer=tok, calibration=domain_text, progress=False)
    kept, new_tok = result.plan.kept_tokens, result.tokenizer
    n_keep = len(tok) - round(0.6 * len(tok))
    assert len(kept) == n_keep == model.config.vocab_size == len(new_tok)
    assert model.get_input_embeddings().weight.shape[0] == n_keep
    assert model.get_output_embeddings().weight.shape[0] == n_keep
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert kept[:3] == [0, 1, 2] and model.config.bos_token_id == 0 and model.config.eos_token_id == 1
    assert result.config.vocab == 0.6 and result.params_after < result.params_before

    text, old_ids = kept_only_text(tok, domain_text, kept)
    new_id = {old: new for new, old in enumerate(kept)}
    new_ids = new_tok(text)["input_ids"]
    assert new_ids == [new_id[i] for i in old_ids]  # same tokens, renumbered
    expected = restricted_reference(original, old_ids, kept)
    with torch.no_grad():
        got = F.log_softmax(model(torch.tensor([new_ids])).logits[0].double(), dim=-1)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_byte_fallback_tokenizer_invariant_and_round_trip(tmp_path, fallback_tok, domain_text):
    model, tok = tiny_saved("llama-untied", fallback_tok, tmp_path / "src")
    original = copy.deepcopy(model)
    vocab = tokenizer_vocab(tok)
    assert vocab.kind == "byte_fallback" and set(range(259)) <= vocab.required
    result = prune(model, PruneConfig(vocab=0.3), tokenizer=tok, calibration=domain_text[:4000], progress=False)
    kept, new_tok = result.plan.kept_tokens, result.tokenizer
    assert set(range(259)) <= set(kept) and len(kept) == len(new_tok) == len(tok) - round(0.3 * len(tok))
    text, old_ids = kept_only_text(tok, domain_text, kept, max_tokens=120)
    new_id = {old: new for new, old in enumerate(kept)}
    new_ids = new_tok(text)["input_ids"]
    assert new_ids[0] == 1 and new_ids == [new_id[i] for i in old_ids]  # BOS from the rewritten post-processor
    with torch.no_grad():
        got = F.log_softmax(model(torch.tensor([new_ids])).logits[0].double(), dim=-1)
    torch.testing.assert_close(got, restricted_reference(original, old_ids, kept), atol=2e-5, rtol=0)
    # any text: the same decoded text as the original gives (Llama-2 style decoders drop a leading space)
    lines = mixed_text(150_000, seed=1).split("\n")
    for a, b in zip(tok(lines, add_special_tokens=False)["input_ids"],
                    new_tok(lines, add_special_tokens=False)["input_ids"]):
        assert all(0 <= i < len(kept) for i in b)
        assert new_tok.decode(b) == tok.decode(a)


def test_any_text_round_trips_byte_level(ref_tok):
    """A few MB of text in many scripts, code and emoji through a tokenizer cut to a few hundred tokens: every id is
    a kept one and decoding gives the text back exactly."""
    vocab = tokenizer_vocab(ref_tok)
    assert vocab.kind == "byte_level" and len(vocab.required) == 259
    kept = sorted(merge_closure(vocab.required | set(range(300, 600)), vocab.parents))
    new_tok = prune_tokenizer(ref_tok, kept)
    text = mixed_text(1_200_000)
    assert len(text.encode()) > 2_000_000
    lines = text.split("\n")
    chunks = ["\n".join(lines[i:i + 200]) + "\n" for i in range(0, len(lines), 200)]
    encoded = new_tok(chunks, add_special_tokens=False)["input_ids"]
    assert max(max(ids) for ids in encoded if ids) < len(kept)
    assert new_tok.batch_decode(encoded, clean_up_tokenization_spaces=False) == chunks


def test_rewritten_tokenizer_json_is_consistent(ref_tok):
    vocab = tokenizer_vocab(ref_tok)
    kept = sorted(merge_closure(vocab.required | set(range(1000, 1400)), vocab.parents))
    for t in kept:  # closed under merges
        for a, b in vocab.parents.get(t, ()):
            assert a in kept and b in kept
    spec = tokenizer_spec(prune_tokenizer(ref_tok, kept))
    model = spec["model"]
    assert sorted(model["vocab"].values()) == list(range(len(kept)))
    for merge in model["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        assert a in model["vocab"] and b in model["vocab"] and a + b in model["vocab"]
    old = tokenizer_spec(ref_tok)
    old_tokens = {i: t for t, i in old["model"]["vocab"].items()}
    assert {t: i for t, i in model["vocab"].items()} == {old_tokens[o]: n for n, o in enumerate(kept)}
    # merges keep their relative order (BPE ranks)
    def pair(m):
        return tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)

    old_rank = {pair(m): r for r, m in enumerate(old["model"]["merges"])}
    ranks = [old_rank[pair(m)] for m in model["merges"]]
    assert ranks == sorted(ranks)
    assert [t["id"] for t in spec["added_tokens"]] == [0, 1, 2]
    assert spec["post_processor"]["special_tokens"]["<s>"]["ids"] == [0]
    assert spec["pre_tokenizer"] == old["pre_tokenizer"] and spec["decoder"] == old["decoder"]


# ----------------------------------------------------------------------------------------------- selection, refusals


def test_frequent_tokens_kept_and_ratio_limits(tmp_path, ref_tok, domain_text):
    model, _ = tiny_saved("llama-tied", ref_tok, tmp_path / "src")
    counts = torch.bincount(torch.tensor(ref_tok(domain_text[:5000], add_special_tokens=False)["input_ids"]),
                            minlength=len(ref_tok))
    result = prune(copy.deepcopy(model), PruneConfig(vocab=0.8), tokenizer=ref_tok, calibration=domain_text[:5000],
                   progress=False)
    kept = set(result.plan.kept_tokens)
    assert set(counts.nonzero().flatten().tolist()) <= kept  # every token of the text (the budget allows it)
    with pytest.raises(RatioError, match="259 tokens must stay"):
        prune(model, PruneConfig(vocab=0.99), tokenizer=ref_tok, calibration=domain_text, progress=False)
    assert model.config.vocab_size == len(ref_tok)  # a refusal changes nothing
    with pytest.raises(CalibrationError, match="counts tokens"):
        prune(model, PruneConfig(vocab=0.5), tokenizer=ref_tok, progress=False)
    with pytest.raises(CalibrationError, match="tokenizer"):
        prune(model, PruneConfig(vocab=0.5), calibration=domain_text, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        PruneConfig(vocab=1.0)
    with pytest.raises(ValueError, match="give params alone"):
        PruneConfig(params=0.2, vocab=0.5)


def test_vocab_text_chooses_the_tokens(tmp_path, ref_tok, domain_text):
    path = tmp_path / "domain.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 50)
    model, _ = tiny_saved("llama-tied", ref_tok, tmp_path / "src")
    result = prune(model, PruneConfig(vocab=0.9, vocab_text=str(path)), tokenizer=ref_tok,
                   calibration=domain_text, progress=False)
    code_ids = set(ref_tok(path.read_text(), add_special_tokens=False)["input_ids"])
    assert code_ids <= set(result.plan.kept_tokens)
    assert result.config.vocab_text == str(path)


def test_unsupported_tokenizers_are_refused(tmp_path, ref_tok, domain_text):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, _ = tiny_saved("llama-tied", ref_tok, tmp_path / "src")
    unigram = Tokenizer(models.Unigram([(f"t{i}", -float(i)) for i in range(len(ref_tok))], 0, False))
    unigram.pre_tokenizer = pre_tokenizers.Whitespace()
    cases = {"Unigram": PreTrainedTokenizerFast(tokenizer_object=unigram)}
    plain = json.loads(ref_tok.backend_tokenizer.to_str())  # BPE that spells nothing in bytes
    plain["pre_tokenizer"] = {"type": "Whitespace"}
    cases["spells any text in bytes"] = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(plain)))
    for message, tok in cases.items():
        with pytest.raises(TokenizerPruneError, match=message):
            prune(model, PruneConfig(vocab=0.5), tokenizer=tok, calibration=domain_text, progress=False)
    assert model.config.vocab_size == len(ref_tok)


def test_head_bias_config_ids_and_plan_replay(tmp_path, ref_tok):
    """An untied head with a bias is cut with it; every special id of the config and generation config follows the
    new numbering (lists too); apply_plan replays the cut on a fresh copy."""
    model, _ = tiny_saved("llama-untied", ref_tok, tmp_path / "src")
    with torch.no_grad():
        head = torch.nn.Linear(64, len(ref_tok), bias=True)
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
        model.lm_head = head
    model.config.pad_token_id = 5000
    model.generation_config.eos_token_id = [1, 4000]
    fresh, original = copy.deepcopy(model), copy.deepcopy(model)
    kept = sorted({0, 1, 2, 4000, 5000} | set(range(100, 400, 3)))
    prune_vocab(model, kept)
    assert model.config.pad_token_id == kept.index(5000)
    assert model.generation_config.eos_token_id == [1, kept.index(4000)]
    ids = [0, 1, 103, 205, 301]
    with torch.no_grad():
        got = F.log_softmax(model(torch.tensor([[kept.index(i) for i in ids]])).logits[0].double(), -1)
    torch.testing.assert_close(got, restricted_reference(original, ids, kept), atol=2e-5, rtol=0)
    from llmprune.core.config import LayerPlan, PrunePlan

    apply_plan(fresh, PrunePlan(layers=[LayerPlan() for _ in range(3)], kept_tokens=kept))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name


def test_vocab_with_other_kinds_and_per_layer_widths(tmp_path, ref_tok, domain_text):
    """Vocabulary last, after FFN neurons with per-layer widths (an llmprune_llama config, whose folder
    AutoTokenizer resolves without the model type's class): one plan, and a save that reloads with the same ids."""
    model, tok = tiny_saved("qwen2-untied", ref_tok, tmp_path / "src")
    result = prune(model, PruneConfig(vocab=0.5, ffn=0.3, method="magnitude", allocation="global"), tokenizer=tok,
                   calibration=domain_text, progress=False)
    assert model.config.model_type == "llmprune_qwen2" and result.plan.kept_tokens is not None
    assert any(lp.kept_neurons for lp in result.plan.layers)
    assert result.config.vocab == 0.5 and result.config.ffn == 0.3 and len(result.tokenizer) == model.config.vocab_size
    out = result.save(tmp_path / "pruned")
    assert read_plan(out).kept_tokens == result.plan.kept_tokens


def test_streaming_and_iterative_refuse_vocab(tmp_path, ref_model_path):
    from llmprune.streaming import prune_streaming
    from llmprune.streaming.source import StreamingError

    with pytest.raises(StreamingError, match="vocabulary pruning"):
        prune_streaming(str(ref_model_path), PruneConfig(vocab=0.5), tmp_path / "out", calibration="x y z")
    assert not (tmp_path / "out").exists()
    from llmprune.training.iterative import prune_iteratively

    with pytest.raises(ValueError, match="vocab"):
        prune_iteratively(torch.nn.Module(), PruneConfig(vocab=0.5), steps=2)


# ------------------------------------------------------------------------------------------------ saved outputs


_FRESH = r"""
import json, sys, numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text, out = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(text)["input_ids"]
with torch.no_grad():
    np.save(out, model(torch.tensor([ids])).logits[0].numpy())
json.dump({"ids": ids, "len": len(tok), "vocab_size": model.config.vocab_size,
           "eos": model.generation_config.eos_token_id, "llmprune": "llmprune" in sys.modules,
           "decoded": tok.decode(tok(sys.argv[4], add_special_tokens=False)["input_ids"])},
          open(out + ".json", "w"))
"""


def test_saved_folder_loads_in_a_fresh_process(tmp_path, ref_tok, domain_text):
    import numpy as np

    model, tok = tiny_saved("qwen2-untied", ref_tok, tmp_path / "src")
    result = prune(model, PruneConfig(vocab=0.7), tokenizer=tok, calibration=domain_text, progress=False)
    out = result.save(tmp_path / "pruned", tokenizer=tok)  # the result's own tokenizer is the one written
    text, _ = kept_only_text(tok, domain_text, result.plan.kept_tokens, max_tokens=60)
    probe = mixed_text(3000, seed=5)
    r = subprocess.run([sys.executable, "-c", _FRESH, str(out), text, str(tmp_path / "logits.npy"), probe],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "logits.npy.json").read_text())
    ids = result.tokenizer(text)["input_ids"]
    assert info["ids"] == ids and info["len"] == info["vocab_size"] == len(result.plan.kept_tokens)
    assert not info["llmprune"] and info["eos"] == model.generation_config.eos_token_id
    assert info["decoded"] == tok.decode(tok(probe, add_special_tokens=False)["input_ids"])  # as the original (NFC)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy", allow_pickle=False), expected, atol=1e-5, rtol=0)
    assert read_plan(out).kept_tokens == result.plan.kept_tokens
    assert read_recipe(out)["config"]["vocab"] == 0.7


def test_save_refuses_the_original_tokenizer(tmp_path, ref_tok, domain_text):
    from llmprune.checkpoint.io import save_pruned
    from llmprune.checkpoint.verify import VerificationError

    model, _ = tiny_saved("llama-tied", ref_tok, tmp_path / "src")
    result = prune(model, PruneConfig(vocab=0.5), tokenizer=ref_tok, calibration=domain_text, progress=False)
    with pytest.raises(VerificationError, match="tokenizer"):
        save_pruned(model, tmp_path / "bad", tokenizer=ref_tok, plan=result.plan)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------- bits per byte


def test_token_bytes_partition_the_text(ref_tok, fallback_tok):
    text = mixed_text(20_000, seed=3)
    for tok in (ref_tok, fallback_tok):
        ids, nbytes = token_bytes(tok, text)
        assert nbytes is not None and len(nbytes) == len(ids) and int(nbytes.min()) >= 0
        assert int(nbytes.sum()) == len(text.encode())  # every byte belongs to exactly one token
        assert int(nbytes[0]) == 0  # BOS covers nothing
        cut_ids, cut = token_bytes(tok, text, max_tokens=100)
        assert torch.equal(cut, nbytes[:100])


def test_bits_per_byte_is_window_independent_and_follows_the_invariant(tmp_path, ref_tok, domain_text):
    model, _ = tiny_saved("llama-untied", ref_tok, tmp_path / "src")
    original = copy.deepcopy(model)
    text = domain_text[:1200]
    n_text_bytes = len(text.encode())
    runs = [perplexity(original, ref_tok, text, seq_len=L, stride=s, progress=False) for L, s in ((64, 32), (128, 48))]
    assert runs[0].n_bytes == runs[1].n_bytes == n_text_bytes  # every token but BOS scored: the whole text
    for r in runs:
        assert r.bits_per_byte == pytest.approx(r.nll * r.n_tokens / (math.log(2) * r.n_bytes), rel=1e-12)
    # non-overlapping windows: the bytes of the scored tokens only
    plain = perplexity(original, ref_tok, text, seq_len=64, progress=False)
    _, nbytes = token_bytes(ref_tok, text)
    assert plain.n_bytes == sum(int(nbytes[first:end].sum()) for _, end, first in windows(len(nbytes), 64))

    result = prune(model, PruneConfig(vocab=0.5), tokenizer=ref_tok, calibration=text, progress=False)
    kept = result.plan.kept_tokens
    ids = ref_tok(text)["input_ids"]
    assert set(ids) <= set(kept)  # the text's own tokens are kept: the invariant applies
    got = perplexity(model, result.tokenizer, text, seq_len=64, stride=32, progress=False)
    assert got.n_bytes == runs[0].n_bytes and got.n_tokens == runs[0].n_tokens
    nll = 0.0  # the reference: the original's windows, restricted to the kept tokens and renormalised
    new_id = {old: new for new, old in enumerate(kept)}
    bos = ref_tok.bos_token_id  # windows after the first are read after the BOS the tokenizer starts texts with
    for start, end, first in windows(len(ids), 64, 32):
        lead = int(start > 0)
        logp = restricted_reference(original, [bos] * lead + ids[start:end], kept)
        new = [new_id[i] for i in ids[first:end]]
        nll -= float(logp[lead + first - start - 1:lead + end - start - 1].gather(1, torch.tensor(new)[:, None]).sum())
    assert got.bits_per_byte == pytest.approx(nll / (math.log(2) * got.n_bytes), rel=1e-5)
    assert got.bits_per_byte <= runs[0].bits_per_byte + 1e-9  # renormalising over fewer tokens never costs


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_prune_vocab_and_eval(tmp_path, ref_model_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT.read_text(encoding="utf-8")[:30_000])
    out = tmp_path / "out"
    rc = main(["prune", str(ref_model_path), "--vocab", "0.5", "--calib", str(calib), "--ppl", str(calib),
               "--ppl-seq-len", "64", "--ppl-max-tokens", "1024", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "vocabulary rows" in text and "4,096 / 8,192" in text and "bits per byte" in text
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 4096
    assert read_plan(out).kept_tokens[:3] == [0, 1, 2]
    recipe = read_recipe(out)
    assert recipe["config"]["vocab"] == 0.5 and recipe["bpb_after"] is not None
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == 4096
    rc = main(["eval", str(out), "--ppl", str(calib), "--seq-len", "64", "--max-tokens", "512", "--no-speed",
               "--out", str(tmp_path / "eval"), "--quiet"])
    assert rc == 0 and "bits per byte" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["results"]["out"]["perplexity"]["bits_per_byte"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--vocab", "0.99"], "must stay"),
    (["--vocab", "0.5", "--streaming"], "not streamed"),
    (["--vocab", "0.5", "--calib", None, "--vocab-text", "missing.txt"], "missing.txt"),
    (["--vocab", "1.5"], "out of range"),
])
def test_cli_refusals_write_nothing(tmp_path, ref_model_path, capsys, flags, message):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT.read_text(encoding="utf-8")[:5000])
    args = ["prune", str(ref_model_path), "--calib", str(calib), "--out", str(tmp_path / "out"), "--quiet"]
    if None in flags:
        args.remove("--calib"), args.remove(str(calib))
        flags = [f for f in flags if f not in ("--calib", None)]
    rc = main(args + flags)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ llama.cpp


def test_gguf_export_carries_the_pruned_tokenizer(tmp_path, ref_tok, domain_text):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from llmprune.checkpoint.gguf_export import compare_logits, export_gguf
    from llmprune.checkpoint.llamacpp import llamacpp_available, run_gguf

    if not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    model, _ = tiny_saved("llama-untied", ref_tok, tmp_path / "src")
    result = prune(model, PruneConfig(vocab=0.6), tokenizer=ref_tok, calibration=domain_text, progress=False)
    folder = result.save(tmp_path / "pruned")
    gguf_file = tmp_path / "pruned.gguf"
    report = export_gguf(folder, gguf_file, outtype="f32")  # checks tokens and logits in llama.cpp itself
    assert report.verified
    text, _ = kept_only_text(ref_tok, domain_text, result.plan.kept_tokens, max_tokens=40)
    ids = result.tokenizer(text)["input_ids"]
    got = run_gguf(gguf_file, ids, [text, mixed_text(400, seed=7)])
    assert got["n_vocab"] == len(result.plan.kept_tokens)
    assert got["tokens"][0] == result.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert got["tokens"][1] == result.tokenizer(mixed_text(400, seed=7), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    compare_logits(expected, got["logits"], "f32")
