"""The tokenizer side of vocabulary pruning: which tokens must stay, and the rewritten ``tokenizer.json``.

A BPE tokenizer keeps working on *any* text after losing most of its vocabulary when three sets stay:

- every special and added token (and the ids the post-processor and padding name);
- the base alphabet that spells any text: the 256 byte-level characters of a byte-level BPE (GPT-2, Llama 3,
  Qwen, SmolLM), or the 256 ``<0xXX>`` byte tokens (and the unk token) of a SentencePiece-style BPE with
  ``byte_fallback`` (Llama 2, Gemma) (those of them the tokenizer has: a byte it lacks, it could not spell before);
- the merge closure: for every kept token made by a merge ``(a, b)``, ``a`` and ``b`` too (every merge making it,
  recursively), and only merges whose result is kept.

Then for any text whose original tokenization uses kept tokens only, BPE applies the same merges in the same order
(the kept merges are a rank-ordered subset holding every merge that text used), so the new tokenizer gives the same
tokens, renumbered. Kept ids are renumbered densely in their old order, so low-id specials keep their ids. Other
texts still tokenize (into shorter pieces) and decode as before. Unigram, WordPiece and WordLevel models, BPE with a
subword prefix or suffix, and BPE with neither a byte-level alphabet nor byte fallback are refused
(:class:`TokenizerPruneError`), before anything is changed.

Example::

    vocab = tokenizer_vocab(tok)                      # what must stay, and which merges make which token
    kept = merge_closure(vocab.required | {100, 2000}, vocab.parents)
    new_tok = prune_tokenizer(tok, kept)              # a transformers tokenizer with len(kept) ids
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["TokenizerPruneError", "TokenizerVocab", "tokenizer_spec", "tokenizer_vocab", "merge_closure",
           "prune_tokenizer_spec", "prune_tokenizer", "BYTE_FALLBACK_TOKENS", "ROUND_TRIP_TEXTS"]

#: the byte tokens of a SentencePiece-style BPE with byte fallback
BYTE_FALLBACK_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
#: texts the rewritten tokenizer must round-trip exactly as the original does (several scripts, code, emoji)
ROUND_TRIP_TEXTS = ("The quick brown fox, 1234567 jumps!\n\tdef f(x):  return x ** 2  # ok",
                    "Съешь же ещё этих мягких булок. 東京タワーと北京。 مرحبا بالعالم हिन्दी पाठ",
                    "emoji 🙂👍🏽 🇫🇷 ZWJ 👩‍💻   spaces   \r\n\n trailing ")
#: files of a slow tokenizer that a rewritten tokenizer.json makes stale (they would describe the old vocabulary)
_STALE_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


class TokenizerPruneError(ValueError):
    """The tokenizer's vocabulary cannot be pruned safely (the message says why and what is supported)."""


@dataclass
class TokenizerVocab:
    """What vocabulary pruning needs to know about one BPE tokenizer.

    Attributes:
        size: number of token ids (largest id + 1).
        kind: ``byte_level`` or ``byte_fallback``: how any text is still spelled.
        required: ids that always stay (specials, added tokens, the base alphabet, unk, post-processor ids).
        ids: every id the tokenizer has (model vocabulary and added tokens).
        parents: token id -> the ``(a, b)`` id pairs of every merge that makes it.
        spec: the ``tokenizers`` JSON (a dict) it was read from.
    """

    size: int
    kind: str
    required: set[int]
    ids: set[int] = field(repr=False)
    parents: dict[int, list[tuple[int, int]]] = field(repr=False)
    spec: dict[str, Any] = field(repr=False)


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizers`` JSON of a fast (``tokenizer.json``) transformers tokenizer, as a dict."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise TokenizerPruneError("vocabulary pruning rewrites tokenizer.json: this tokenizer has none (a slow, "
                                  "Python-only tokenizer); use a model folder with a tokenizer.json")
    return json.loads(backend.to_str())


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    # tokenizers writes merges as "a b" (older files) or ["a", "b"] (newer)
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


def _steps(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not spec:
        return []
    inner = spec.get("pretokenizers") or spec.get("processors")
    return [s for step in inner for s in _steps(step)] if inner else [spec]


def _processor_ids(node: Any) -> set[int]:
    """Token ids a post-processor names (TemplateProcessing ``special_tokens``, Bert/Roberta ``sep`` / ``cls``)."""
    out: set[int] = set()
    if isinstance(node, dict):
        if isinstance(node.get("ids"), list) and "tokens" in node:
            out.update(int(i) for i in node["ids"])
        for key, value in node.items():
            if key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                out.add(value[1])
            else:
                out |= _processor_ids(value)
    elif isinstance(node, list):
        for value in node:
            out |= _processor_ids(value)
    return out


def _remap_processor(node: Any, new_id: dict[int, int]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ids" and isinstance(value, list) and "tokens" in node:
                out[key] = [new_id[int(i)] for i in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                out[key] = [value[0], new_id[value[1]]]
            else:
                out[key] = _remap_processor(value, new_id)
        return out
    if isinstance(node, list):
        return [_remap_processor(v, new_id) for v in node]
    return node


def tokenizer_vocab(tokenizer: Any, extra_required: Iterable[int] = ()) -> TokenizerVocab:
    """Read what must stay and the merge structure from ``tokenizer``; refuses what cannot be rewritten safely.

    ``extra_required``: ids that must stay too (e.g. the special-token ids of the model's config).

    Example::

        vocab = tokenizer_vocab(tok, extra_required=[model.config.eos_token_id])
        vocab.kind, len(vocab.required)        # ('byte_level', 259)
    """
    spec = tokenizer_spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerPruneError(f"vocabulary pruning rewrites BPE tokenizers (byte-level, or with byte fallback); "
                                  f"this one is {model.get('type') or 'of an unknown type'}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerPruneError("vocabulary pruning does not rewrite BPE tokenizers with a subword prefix or "
                                  "end-of-word suffix (their merges do not simply concatenate)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = spec.get("added_tokens") or []
    ids = set(vocab.values()) | {int(t["id"]) for t in added}
    size = max(ids) + 1 if ids else 0
    byte_level = any(s.get("type") == "ByteLevel" for s in _steps(spec.get("pre_tokenizer")))
    required: set[int] = {int(t["id"]) for t in added}
    # Every byte token the tokenizer has stays. Some lack a few (SmolLM2: bytes no UTF-8 text holds, and control
    # characters its training never saw): the original cannot spell those either, and neither can the result.
    if byte_level:
        from tokenizers.pre_tokenizers import ByteLevel

        required |= {vocab[c] for c in ByteLevel.alphabet() if c in vocab}
        kind = "byte_level"
    elif model.get("byte_fallback"):
        required |= {vocab[t] for t in BYTE_FALLBACK_TOKENS if t in vocab}
        kind = "byte_fallback"
    else:
        raise TokenizerPruneError("vocabulary pruning needs a BPE tokenizer that spells any text in bytes (a "
                                  "byte-level pre-tokenizer, or byte_fallback); this one would turn text outside "
                                  "the kept tokens into unknown tokens")
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        required.add(vocab[unk])
    required |= _processor_ids(spec.get("post_processor"))
    padding = spec.get("padding") or {}
    if isinstance(padding.get("pad_id"), int) and padding["pad_id"] in ids:
        required.add(padding["pad_id"])
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        if isinstance(tid, int) and tid in ids:
            required.add(tid)
    required |= {int(i) for i in extra_required if int(i) in ids}
    parents: dict[int, list[tuple[int, int]]] = {}
    for a, b in _merge_pairs(model.get("merges") or []):
        if a in vocab and b in vocab and a + b in vocab:
            parents.setdefault(vocab[a + b], []).append((vocab[a], vocab[b]))
    return TokenizerVocab(size, kind, required, ids, parents, spec)


def merge_closure(ids: Iterable[int], parents: dict[int, list[tuple[int, int]]],
                  kept: set[int] | None = None) -> set[int]:
    """``ids`` with the parts of every merge that makes one of them, recursively (those already in ``kept`` are
    not expanded again); returns the new ids (``kept`` is not changed).

    Example::

        merge_closure([vocab_id_of_"Ġthe"], vocab.parents)   # {"Ġthe", "Ġt", "he", "Ġ", "t", "h", "e"} as ids
    """
    seen = set(kept or ())
    out: set[int] = set()
    stack = [i for i in ids if i not in seen]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        out.add(t)
        for a, b in parents.get(t, ()):
            stack += [x for x in (a, b) if x not in seen]
    return out


def prune_tokenizer_spec(spec: dict[str, Any], kept: Sequence[int]) -> tuple[dict[str, Any], dict[int, int]]:
    """The ``tokenizers`` JSON keeping only ``kept`` (old ids), renumbered densely in old order; returns it and the
    old -> new id map. Normalizer, pre-tokenizer and decoder are unchanged; model vocabulary, merges, added tokens,
    post-processor ids and the padding id are rewritten. ``kept`` must hold every added token (a ``ValueError``
    otherwise) and be closed under merges (:func:`merge_closure`).
    """
    new_id = {old: new for new, old in enumerate(sorted(set(int(i) for i in kept)))}
    model = dict(spec["model"])
    vocab = {tok: new_id[i] for tok, i in model["vocab"].items() if i in new_id}
    merges = []
    for raw, (a, b) in zip(model.get("merges") or [], _merge_pairs(model.get("merges") or [])):
        if a + b in vocab:
            if a not in vocab or b not in vocab:
                raise ValueError("the kept tokens are not closed under merges (see merge_closure)")
            merges.append(raw)
    model["vocab"], model["merges"] = vocab, merges
    out = dict(spec, model=model)
    added = []
    for t in spec.get("added_tokens") or []:
        if int(t["id"]) not in new_id:
            raise ValueError("every added and special token must be kept")
        added.append(dict(t, id=new_id[int(t["id"])]))
    out["added_tokens"] = added
    if spec.get("post_processor"):
        out["post_processor"] = _remap_processor(spec["post_processor"], new_id)
    if isinstance((spec.get("padding") or {}).get("pad_id"), int):
        out["padding"] = dict(spec["padding"], pad_id=new_id.get(spec["padding"]["pad_id"], 0))
    return out, new_id


def _rewrite_ids_in_config(folder: Path, new_id: dict[int, int]) -> None:
    """``added_tokens_decoder`` (tokenizer_config.json) and ``added_tokens.json`` name tokens by id: renumber."""
    path = folder / "tokenizer_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data.get("added_tokens_decoder"), dict):
            data["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in data["added_tokens_decoder"].items()
                                            if int(k) in new_id}
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    added = folder / "added_tokens.json"
    if added.is_file():
        data = json.loads(added.read_text(encoding="utf-8"))
        added.write_text(json.dumps({k: new_id[v] for k, v in data.items() if v in new_id}, ensure_ascii=False),
                         encoding="utf-8")


def prune_tokenizer(tokenizer: Any, kept: Sequence[int], config: Any = None) -> Any:
    """A new transformers tokenizer with only ``kept`` (old ids, closed under merges), as a user reloading the saved
    folder gets it: the tokenizer's own files are written to a temporary folder with the rewritten tokenizer.json
    (chat template and tokenizer_config kept; stale slow-tokenizer vocabularies dropped), beside ``config`` (the
    model's config: ``AutoTokenizer`` picks some tokenizer classes by the model type, e.g. Qwen2's), and loaded back
    by ``AutoTokenizer`` (no remote code). ``tokenizer`` is not changed.

    The result is checked: every kept token has its new id, special tokens keep their roles, and the
    :data:`ROUND_TRIP_TEXTS` decode as they do with the original; :class:`TokenizerPruneError` otherwise.

    Example::

        new_tok = prune_tokenizer(tok, kept)
        new_tok.save_pretrained("out/")
    """
    from transformers import AutoTokenizer

    spec = tokenizer_spec(tokenizer)
    new_spec, new_id = prune_tokenizer_spec(spec, kept)
    from tokenizers import Tokenizer

    Tokenizer.from_str(json.dumps(new_spec))  # the tokenizers library accepts it
    with tempfile.TemporaryDirectory(prefix="llmprune-tokenizer-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        for name in _STALE_FILES:
            (folder / name).unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text(json.dumps(new_spec, ensure_ascii=False), encoding="utf-8")
        _rewrite_ids_in_config(folder, new_id)
        if config is not None:
            config.to_json_file(str(folder / "config.json"))
        new = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    new.name_or_path = getattr(tokenizer, "name_or_path", "")
    _check(tokenizer, new, new_spec, new_id)
    return new


def _check(old: Any, new: Any, spec: dict[str, Any], new_id: dict[int, int]) -> None:
    want = dict(spec["model"]["vocab"])
    want.update({t["content"]: t["id"] for t in spec.get("added_tokens") or []})
    got = new.get_vocab()
    wrong = sum(1 for tok, i in want.items() if got.get(tok) != i)
    if wrong or len(got) != len(want):
        raise TokenizerPruneError(f"the rewritten tokenizer does not reload with its new ids ({wrong} of {len(want)} "
                                  f"tokens differ, {len(got)} loaded)")
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(old, f"{name}_token_id", None)
        if isinstance(tid, int) and getattr(new, f"{name}_token_id", None) != new_id.get(tid):
            raise TokenizerPruneError(f"the rewritten tokenizer lost its {name} token")
    for text in ROUND_TRIP_TEXTS:
        ids = new(text, add_special_tokens=False)["input_ids"]
        if any(not 0 <= i < len(new_id) for i in ids):
            raise TokenizerPruneError("the rewritten tokenizer emits ids outside the kept vocabulary")
        if new.decode(ids) != old.decode(old(text, add_special_tokens=False)["input_ids"]):
            raise TokenizerPruneError("the rewritten tokenizer does not decode its tokens back to the text the "
                                      "original gives")
