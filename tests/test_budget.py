"""``--params`` with the vocabulary axis (issue 38): the candidate grid over (vocab, hidden, blocks) shares, the
held-out loss per byte of text (fair across tokenizers), the stand-in that refits when the final method refits,
and the report / CLI rows. Tiny random Llamas with the reference model's byte-level BPE tokenizer."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.arch import get_adapter
from llmprune.calibration.held_out import split_held_out, text_loss, token_byte_lengths
from llmprune.cli.table import budget_notes, budget_rows, width_rows
from llmprune.structured.budget import choose_split, parameter_groups, share_grid, split_for
from llmprune.structured.criteria import base as criteria_base
from llmprune.structured.criteria.base import Criterion, final_refits
from llmprune.structured.vocab import prune_vocab

from conftest import REF_MODEL
from tiny_models import tiny_causal_lm

#: the existing tolerance of the params target (whole heads, neurons, channels and rows)
TOLERANCE = 0.04


@pytest.fixture(scope="module")
def tok():
    if not REF_MODEL.is_dir():
        pytest.skip(f"reference model not found at {REF_MODEL}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REF_MODEL)


def domain_text(n_lines: int = 600, seed: int = 0) -> str:
    """Sentences over a dozen words: a domain that uses a few dozen of the tokenizer's 8192 tokens."""
    rng = random.Random(seed)
    words = "the cat sat on a mat and the dog ran to the big red house".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(n_lines))


def tiny_model(tok, layers: int = 3, tied: bool = True):
    return tiny_causal_lm("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          tie_word_embeddings=tied, max_position_embeddings=256, num_hidden_layers=layers)


# ---------------------------------------------------------------------------------------------- pure functions


def test_share_grid_is_a_small_stated_simplex():
    assert len(share_grid(True, True)) == 10 and len(share_grid(False, True)) == 4
    assert len(share_grid(True, False)) == 4 and share_grid(False, False) == [(0.0, 0.0, 1.0)]
    for v, h, b in share_grid(True, True):
        assert v + h + b == pytest.approx(1.0) and min(v, h, b) >= 0
    assert all(v == 0 for v, _, _ in share_grid(False, True)) and all(h == 0 for _, h, _ in share_grid(True, False))


def test_split_held_out_is_disjoint_spread_and_whole():
    text = "".join(f"line {i} of the text\n" for i in range(400))
    calib, held = split_held_out(text, held_chars=len(text) // 4, pieces=8)
    assert len(calib) + len(held) == len(text) and len(held) == pytest.approx(len(text) / 4, rel=0.15)
    held_lines, calib_lines = held.splitlines(), calib.splitlines()
    assert set(held_lines).isdisjoint(calib_lines) and sorted(held_lines + calib_lines) == sorted(text.splitlines())
    numbers = [int(line.split()[1]) for line in held_lines]
    assert min(numbers) < 50 and max(numbers) == 399  # from every part of the text, whole lines
    assert split_held_out(text, len(text) // 4) == (calib, held)  # pure
    assert split_held_out("a\nb\nc\nd\n", 4, pieces=2) == ("a\nc\n", "b\nd\n")
    assert split_held_out(text, 0) == (text, "")
    paragraphs = "".join(f"paragraph {i} " + "word " * 60 + "\n" for i in range(40))  # lines longer than a piece
    _, held = split_held_out(paragraphs, 1000)
    assert 500 <= len(held) <= 1500


def test_token_byte_lengths_partition_the_text(tok):
    text = "Héllo wörld — 東京 🙂 done\n  spaces"
    enc = tok(text, return_offsets_mapping=True)
    nbytes = token_byte_lengths(text, enc["offset_mapping"])
    assert int(nbytes.sum()) == len(text.encode()) and int(nbytes[0]) == 0  # BOS covers nothing


def test_text_loss_scores_every_token_once(tok):
    model, text = tiny_model(tok), domain_text(12, seed=2)
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():  # one window holding the whole text: a plain forward
        plain = float(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum"))
    whole = text_loss(model, tok, text, seq_len=ids.shape[1] + 1)
    assert whole.nll == pytest.approx(plain, rel=1e-5) and whole.n_bytes == len(text.encode())
    windowed = text_loss(model, tok, text, seq_len=16, batch_size=3)  # BOS + 15 tokens, overlapping by one
    assert windowed.n_tokens == whole.n_tokens == ids.shape[1] - 1 and windowed.n_bytes == whole.n_bytes
    assert windowed.nll != pytest.approx(whole.nll, rel=1e-6)  # less context per token


def test_loss_per_byte_is_tokenizer_fair(tok):
    """The same distribution behind two tokenizers: the original model, whose LM head gives the removed tokens no
    probability (a bias of -1e4), and its vocabulary-pruned copy with the rewritten tokenizer. On a text using kept
    tokens only the loss per byte is equal; on a text the pruned tokenizer cuts finer, both count the same bytes."""
    text = domain_text(40, seed=1)
    model = tiny_model(tok, tied=False)
    used = set(tok(domain_text(600))["input_ids"])
    from llmprune.checkpoint.tokenizer_prune import merge_closure, prune_tokenizer, tokenizer_vocab

    vocab = tokenizer_vocab(tok)
    kept = sorted(merge_closure(vocab.required | used, vocab.parents))
    with torch.no_grad():
        head = torch.nn.Linear(64, len(tok), bias=True)
        head.weight.copy_(model.lm_head.weight * 8)  # peakier than the 0.02 init
        head.bias.fill_(-1e4)
        head.bias[torch.tensor(kept)] = 0.0
        model.lm_head = head
    pruned, new_tok = copy.deepcopy(model), prune_tokenizer(tok, kept, model.config)
    prune_vocab(pruned, kept)
    a, b = text_loss(model, tok, text, seq_len=32), text_loss(pruned, new_tok, text, seq_len=32)
    assert a.n_bytes == b.n_bytes == len(text.encode()) and a.n_tokens == b.n_tokens
    assert b.per_byte == pytest.approx(a.per_byte, rel=1e-5) and a.per_byte > 0.1
    other = "Zebras quickly juxtaposed voluminous xylophones, 42 times."  # tokens outside the kept ones
    a, b = text_loss(model, tok, other, seq_len=32), text_loss(pruned, new_tok, other, seq_len=32)
    assert b.n_tokens > a.n_tokens and a.n_bytes == b.n_bytes == len(other.encode())


def test_final_refits_is_declared_by_the_method(monkeypatch):
    assert criteria_base.get_criterion("obs").refits and not criteria_base.get_criterion("wanda").refits
    assert final_refits(PruneConfig(heads=0.25)) and final_refits(PruneConfig(heads=0.25, method="wanda",
                                                                              reconstruct=True))
    assert not final_refits(PruneConfig(heads=0.25, method="wanda"))
    monkeypatch.setitem(criteria_base._CRITERIA, "refitter",
                        Criterion("refitter", None, True, "a method that refits", refits=True))
    assert final_refits(PruneConfig(heads=0.25, method="refitter"))  # declared, not named anywhere


# ------------------------------------------------------------------------------------------------ choose_split


@pytest.mark.parametrize("tied", [True, False])
def test_vocab_rows_take_their_share_within_the_vocab_stage_limit(tok, tied):
    model = tiny_model(tok, tied=tied)
    adapter, d = get_adapter(model), model.config.hidden_size
    groups = parameter_groups(model, adapter)
    assert groups["vocab"] == (1 if tied else 2) * len(tok) * d and groups["rows"] == len(tok)  # tied: counted once
    cfg = PruneConfig(params=0.05)
    split = split_for(model, adapter, cfg, 0.0, groups, vocab_share=1.0, max_vocab=0.9)
    assert split.hidden == split.heads == split.ffn == 0 and split.params == 0
    assert split.vocab * groups["vocab"] == pytest.approx(0.05 * groups["total"], rel=1e-3)
    mixed = split_for(model, adapter, cfg, 0.0, groups, vocab_share=1 / 3, max_vocab=0.9)
    assert mixed.vocab == pytest.approx(split.vocab / 3, abs=1 / len(tok)) and mixed.ffn > 0
    assert split_for(model, adapter, cfg, 0.0, groups, vocab_share=1.0, max_vocab=split.vocab / 2) is None


@pytest.mark.parametrize("method, reconstruct, refit", [("obs", False, True), ("wanda", False, False),
                                                         ("wanda", True, True)])
def test_the_stand_in_refits_when_the_final_method_refits(tok, method, reconstruct, refit):
    model = tiny_model(tok)
    seen = []

    def spy(trial, proxy, **kwargs):  # records the stand-in's config, prunes nothing
        seen.append(proxy)

    cfg = PruneConfig(params=0.1, method=method, reconstruct=reconstruct, n_samples=8, seq_len=32)
    calib = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    chosen, report = choose_split(model, get_adapter(model), cfg, list(calib.split(4)), spy, progress=False,
                                  tokenizer=tok)
    assert seen and all(p.method == "wanda" and p.reconstruct == refit and p.allocation == "uniform" for p in seen)
    assert report["proxy_refits"] == refit and chosen.method == method and chosen.reconstruct == reconstruct
    assert report["loss_unit"] == "nats per token"  # token ids: no text to hold out, no vocabulary axis
    assert all(c["vocab"] == 0 for c in report["candidates"]) and any("token ids" in n for n in report["notes"])


def test_vocab_axis_is_measured_and_chosen_when_cheapest(tok):
    """A domain text of a dozen words: removing unused vocabulary rows costs nothing on held-out domain text, while
    the same parameters in heads / neurons / channels do. The vocabulary axis is chosen; the result carries the
    rewritten tokenizer and meets the target."""
    model = tiny_model(tok, layers=8)
    with torch.no_grad():  # blocks that matter: a peakier model than the 0.02 init
        for layer in model.model.layers:
            for p in layer.parameters():
                if p.ndim == 2:
                    p.mul_(6.0)
    text = domain_text()
    cfg = PruneConfig(params=0.2, method="wanda", n_samples=8, seq_len=64)
    result = prune(model, cfg, tokenizer=tok, calibration=text, progress=False)
    budget = result.budget
    assert budget["loss_unit"] == "nats per byte of held-out text" and budget["proxy_refits"] is False
    cands = budget["candidates"]
    assert len(cands) + len(budget["skipped"]) == 10 and any(c["vocab"] > 0 for c in cands)
    for c in cands:  # each candidate meets the target; shares, ratios, loss per byte recorded
        assert abs(c["removed"] - 0.2) < TOLERANCE, c
        assert c["loss_per_byte"] == c["loss"] > 0
        assert c["vocab_share"] + c["hidden_share"] + c["blocks_share"] == pytest.approx(1.0, abs=1e-3)
    chosen = cands[budget["chosen"]]
    assert chosen["loss"] == min(c["loss"] for c in cands) and chosen["vocab"] > 0
    blocks_only = next(c for c in cands if c["blocks_share"] == 1.0)
    assert chosen["loss"] < blocks_only["loss"] - 0.05  # clearly cheaper
    assert result.config.vocab == chosen["vocab"] and result.config.params == 0.0
    assert result.tokenizer is not None and len(result.tokenizer) == model.config.vocab_size
    assert abs(1 - result.params_after / result.params_before - 0.2) < TOLERANCE
    # the CLI rows: the chosen vocabulary ratio in the unit table, the candidates with their shares
    rows = width_rows(PruneConfig(params=0.2), result.config, 64, int(model.config.hidden_size),
                      result.params_before, result.params_after, len(tok), model.config.vocab_size)
    assert rows[0][0] == "vocabulary rows" and rows[0][1] == f"({chosen['vocab']:.3f})"
    table = budget_rows(budget)
    assert table[0][1] == "vocab" and table[0][-1] == "loss/byte"
    assert sum("<- chosen" in r[0] for r in table) == 1 and len(table) == len(cands) + 1
    assert len(budget_notes(budget)) == len(budget["skipped"]) + len(budget["notes"])


def test_vocab_axis_is_left_out_without_a_rewritable_tokenizer(tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram([(f"t{i}", -float(i)) for i in range(len(tok))], 0, False))
    unigram.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tiny_model(tok)
    text = domain_text(300)
    cfg = PruneConfig(params=0.1, method="magnitude", n_samples=4, seq_len=32)
    _, report = choose_split(model, get_adapter(model), cfg, [], lambda *a, **k: None, progress=False,
                             tokenizer=PreTrainedTokenizerFast(tokenizer_object=unigram), text=text)
    assert all(c["vocab"] == 0 for c in report["candidates"]) and len(report["candidates"]) <= 4
    assert any("vocabulary axis not measured" in n and "BPE" in n for n in report["notes"])
    assert report["loss_unit"] == "nats per byte of held-out text"
