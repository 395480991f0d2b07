"""Vocabulary pruning: keep the tokens a domain text uses most, remove the other rows of the embedding and LM head.

``PruneConfig(vocab=0.5)`` removes half of the vocabulary rows. The kept tokens are counted in
``PruneConfig.vocab_text`` (default: the calibration text), and always include what keeps the tokenizer working on
any text (specials, the byte alphabet, the merges that build every kept token:
:mod:`llmprune.checkpoint.tokenizer_prune`). The rest of the budget goes to the most frequent tokens, each with the
merge parts it needs; when the text runs out of tokens, the earliest-merged (lowest id) ones fill it.

The cut is exact for what is kept: the pruned model's next-token distribution on a text whose tokens are all kept
is the original one restricted to the kept tokens and renormalised, since every kept row of the LM head (and its
bias) and every kept embedding row is unchanged. Tied heads stay tied; ``config.vocab_size`` and every
``*_token_id`` of the config and generation config follow the new numbering, which keeps the old order (low-id
special tokens keep their ids).

The selection is a registered ``vocab`` criterion, ``frequency`` (:mod:`.criteria.units`).

Example::

    result = prune(model, PruneConfig(vocab=0.5), tokenizer=tok, calibration="domain.txt")
    result.tokenizer               # the rewritten tokenizer: result.save(...) writes it beside the model
    result.plan.kept_tokens        # original ids of the kept rows
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..arch.surgery import slice_module
from ..calibration.calibrate import CalibrationError, calibration_text, read_calibration_text
from ..checkpoint.tokenizer_prune import (TokenizerPruneError, TokenizerVocab, merge_closure, prune_tokenizer,
                                          tokenizer_vocab)
from ..core.config import PruneConfig, RatioError
from .criteria.units import get_unit_criterion, register_unit_criterion

__all__ = ["VocabSelection", "count_tokens", "frequency_tokens", "choose_vocab", "prune_vocab", "config_token_ids",
           "vocab_source"]

#: characters of text tokenized per call when counting (cut at a newline)
_CHUNK_CHARS = 1 << 20


@dataclass
class VocabSelection:
    """The kept rows (original ids, ascending) and the tokenizer rewritten for them, loaded as a folder of
    ``model_type`` loads it."""

    kept: list[int]
    tokenizer: Any
    rows: int
    model_type: str


def vocab_source(config: PruneConfig, calibration: Any) -> str | torch.Tensor | list[torch.Tensor]:
    """What the tokens are counted in: ``config.vocab_text`` (a file or dataset name) when set, else the
    calibration (a file, dataset name or raw text, or token ids); :class:`CalibrationError` without either."""
    if config.vocab_text:
        return read_calibration_text(config.vocab_text)
    if calibration is None:
        raise CalibrationError("vocabulary pruning counts tokens in a text: pass calibration=<text file> or "
                               "PruneConfig(vocab_text=...) (CLI: --calib FILE or --vocab-text FILE)")
    text = calibration_text(calibration)  # a file or dataset name, else the text itself (as as_batches reads it)
    if text is not None:
        return text
    if isinstance(calibration, torch.Tensor):
        return calibration
    return list(calibration)


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def count_tokens(tokenizer: Any, source: str | torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """How often each id in ``[0, size)`` occurs: in ``source`` tokenized without special tokens (a text), or in
    the given token ids.

    Example::

        counts = count_tokens(tok, "some domain text ...", len(tok))     # int64 [size]
    """
    counts = torch.zeros(size, dtype=torch.long)
    if isinstance(source, str):
        chunks = _chunks(source)
        for i in range(0, len(chunks), 8):
            for ids in tokenizer(chunks[i:i + 8], add_special_tokens=False, verbose=False)["input_ids"]:
                counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=size)[:size]
        return counts
    for batch in [source] if isinstance(source, torch.Tensor) else source:
        ids = batch.reshape(-1).long().cpu()
        counts += torch.bincount(ids[(ids >= 0) & (ids < size)], minlength=size)
    return counts


def frequency_tokens(counts: torch.Tensor, vocab: TokenizerVocab, n_keep: int) -> list[int]:
    """The ``frequency`` criterion: ``vocab.required`` with its merge closure, then the most frequent tokens (ties
    and unseen tokens by lower id) each with its own closure while it fits ``n_keep``; sorted ids.

    Raises :class:`RatioError` when the required tokens alone exceed ``n_keep``.
    """
    kept = merge_closure(vocab.required, vocab.parents)
    if len(kept) > n_keep:
        raise RatioError(f"{len(kept)} tokens must stay (special and added tokens, the byte alphabet and the merges "
                         f"building them) but only {n_keep} rows would be kept: remove less of the vocabulary")
    count = counts.tolist()
    order = sorted(vocab.ids, key=lambda i: (-count[i], i))
    for t in order:
        if len(kept) >= n_keep:
            break
        if t in kept:
            continue
        new = merge_closure([t], vocab.parents, kept)
        if len(kept) + len(new) <= n_keep:
            kept |= new
    return sorted(kept)


register_unit_criterion("vocab", "frequency", "the tokens the domain text uses most, with specials, the byte alphabet "
                        "and the merges building them", frequency_tokens, calibration="required",
                        needs=("token_counts",), streams=False, default=True)


def _token_id_fields(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    return {k: v for k, v in data.items() if k.endswith(("_token_id", "_token_ids")) and v is not None}


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _ints(v)]
    return []


def config_token_ids(model: nn.Module) -> set[int]:
    """Every token id the model's config and generation config name (bos/eos/pad/..., lists too)."""
    out: set[int] = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for value in _token_id_fields(cfg).values():
            out.update(_ints(value))
    return out


def _remap(value: Any, new_id: dict[int, int]) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return new_id.get(value)
    if isinstance(value, (list, tuple)):
        mapped = [_remap(v, new_id) for v in value]
        return type(value)(v for v in mapped if v is not None)
    return value


def choose_vocab(model: nn.Module, config: PruneConfig, tokenizer: Any, calibration: Any) -> VocabSelection:
    """Count, choose and rewrite the tokenizer, before the model is changed (so a refusal writes nothing).

    Example::

        sel = choose_vocab(model, PruneConfig(vocab=0.5), tok, "domain.txt")
        prune_vocab(model, sel.kept)
    """
    if tokenizer is None:
        raise CalibrationError("vocabulary pruning needs the model's tokenizer (tokenizer=...): it is rewritten too")
    rows = int(model.get_input_embeddings().weight.shape[0])
    vocab = tokenizer_vocab(tokenizer, extra_required=[i for i in config_token_ids(model) if 0 <= i < rows])
    if vocab.size > rows:
        raise TokenizerPruneError(f"the tokenizer has {vocab.size} token ids but the model's embedding only {rows} "
                                  "rows: they do not belong together")
    counts = count_tokens(tokenizer, vocab_source(config, calibration), rows)
    n_keep = rows - int(round(config.vocab * rows))
    kept = get_unit_criterion("vocab").fn(counts, vocab, n_keep)
    return VocabSelection(kept, prune_tokenizer(tokenizer, kept, model.config), rows, str(model.config.model_type))


@torch.no_grad()
def prune_vocab(model: nn.Module, kept: Sequence[int]) -> dict[int, int]:
    """Keep only rows ``kept`` (original ids) of the input embedding and the LM head (weight and bias; a tied head
    stays tied), renumbered in order; update ``config.vocab_size`` and the special-token ids of the config and
    generation config. Returns the old -> new id map.

    Example::

        new_id = prune_vocab(model, [0, 1, 2, 5, 9])     # model.config.vocab_size == 5
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    rows = int(emb.weight.shape[0])
    idx = sorted(set(int(i) for i in kept))
    if not idx or idx[0] < 0 or idx[-1] >= rows:
        raise ValueError(f"kept token ids must lie in [0, {rows})")
    new_id = {old: new for new, old in enumerate(idx)}
    keep = torch.as_tensor(idx, dtype=torch.long)
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.index_select(0, keep.to(emb.weight.device)).contiguous(),
                              requires_grad=emb.weight.requires_grad)
    if hasattr(emb, "num_embeddings"):
        emb.num_embeddings = len(idx)
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = new_id.get(emb.padding_idx)
    if head is not None:
        if tied:  # one parameter: cut once, the head points at it again (its bias, if any, is its own)
            head.weight = emb.weight
            bias = getattr(head, "bias", None)
            if isinstance(bias, torch.Tensor):
                head.bias = nn.Parameter(bias.index_select(0, keep.to(bias.device)).contiguous(),
                                         requires_grad=bias.requires_grad)
            if hasattr(head, "out_features"):
                head.out_features = len(idx)
        else:
            slice_module(head, "out", keep)
    for module in model.modules():  # e.g. LlamaForCausalLM.vocab_size, read by some forward code
        if getattr(module, "vocab_size", None) == rows and not isinstance(module, nn.Embedding):
            module.vocab_size = len(idx)
    model.config.vocab_size = len(idx)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key, value in _token_id_fields(cfg).items():
            setattr(cfg, key, _remap(value, new_id))
    return new_id
