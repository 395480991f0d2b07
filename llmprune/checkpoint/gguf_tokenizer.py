"""The tokenizer of a GGUF export: a byte-level BPE ``tokenizer.json`` written as llama.cpp's ``gpt2`` tokenizer
model (vocabulary, merges, token types, special-token ids, BOS/EOS behaviour, chat template), and the check that
llama.cpp tokenizes text as the model's tokenizer does.

Example::

    info = add_tokenizer(writer, tokenizer, vocab_size)     # -> {"add_bos": ..., "special": [...]}
"""

from __future__ import annotations

import json
from typing import Any

from .errors import GGUFExportError
from .verify import VerificationError

__all__ = ["add_tokenizer", "check_tokenizer"]


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json pre-tokenizer (llama-vocab.cpp's regex sets)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex, inside ByteLevel
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM / SmolLM2, StarCoder2-style)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"  # Llama 3
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"):
            return "qwen2"
    raise GGUFExportError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has "
                          "no llama.cpp equivalent known to llmprune (byte-level BPE with the GPT-2, SmolLM, Llama 3 "
                          "or Qwen2 splits is exported)")


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Write the vocabulary, merges, special tokens and chat template; returns what the check needs."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizer.json) tokenizer in the model folder")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(f"GGUF export: only byte-level BPE tokenizers are exported (llama.cpp 'gpt2'); this one "
                              f"is {model.get('type')!r}{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}")
    pre = _pre_tokenizer_name(spec)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(max(vocab.values()) + 1, vocab_size)
    if n > vocab_size:
        raise GGUFExportError(f"GGUF export: the tokenizer has ids up to {n - 1} but the model's vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(n)]  # unused ids (the embedding is larger than the vocabulary)
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for i, t in added.items():
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n:
            getattr(writer, f"add_{name}_token_id")(tid)
            ids[name] = tid
    # BOS/EOS as the tokenizer adds them (its post-processor), so llama.cpp tokenizes prompts the same way
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = "bos" in ids and len(full) > len(plain) and full[0] == ids["bos"]
    add_eos = "eos" in ids and len(full) > len(plain) and full[-1] == ids["eos"]
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(add_eos))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return {"add_bos": add_bos, "special": [t["content"] for t in added.values() if t.get("special")]}


def check_tokenizer(tokenizer: Any, got: list[list[int]], texts: list[str]) -> None:
    """Refuse a file whose llama.cpp tokenization of ``texts`` (``got``) differs from the model tokenizer's."""
    for text, ids in zip(texts, got):
        want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if want != ids:
            first = next((i for i, (a, b) in enumerate(zip(want, ids)) if a != b), min(len(want), len(ids)))
            raise VerificationError(f"llama.cpp tokenizes the check text differently from the model's tokenizer "
                                    f"(first difference at token {first} of {len(want)})")
