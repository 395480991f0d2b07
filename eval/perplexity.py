"""Perplexity with the standard windowed protocol.

The text is tokenised once (with the tokenizer's special tokens, i.e. a leading BOS for
Llama-style tokenizers), optionally cut to the first ``max_tokens`` tokens, and split into
windows of ``seq_len`` tokens. When the tokenizer starts every text with a BOS token, every
window after the first is given it too, in front of its ``seq_len`` tokens, as context only
(``bos_every_window``): the scored tokens do not change, and a model that expects a BOS first
(Gemma) is scored as it runs rather than on windows it never saw in training:

* non-overlapping (``stride`` is ``None`` or equal to ``seq_len``, the papers' protocol):
  ``n_tokens // seq_len`` full windows, the tail is dropped, and every window scores its
  ``seq_len - 1`` next-token predictions (``drop_last=False`` also scores the partial
  tail window);
* sliding (``stride < seq_len``): each window ends ``stride`` tokens after the previous
  one and scores only the tokens no earlier window scored, with up to ``seq_len - 1``
  tokens of context (the first window scores all its tokens); every token but the first
  is scored exactly once.

PPL = exp(mean NLL over all scored tokens), with the loss computed in float32.

Bits per byte = total NLL (nats) of the scored tokens / (ln 2 x the UTF-8 bytes of the text those tokens cover), so
that two tokenizers on the same text are compared per byte of text rather than per token. Every byte of the
evaluated text belongs to exactly one token, read from the tokenizer's offsets: token ``i`` covers the bytes after
the end of the tokens before it, up to the end of its own span. So a space whose offsets a token trims belongs to
that token, a character split over several byte-level tokens belongs to the first of them, and the special tokens
the tokenizer adds (BOS) cover no bytes. The evaluated text is the text up to the end of the last token kept (all
of it unless ``max_tokens`` cuts it). With sliding windows (``stride``) every token but the first is scored, so
the bytes counted are the evaluated text's (less the first token's, none when it is BOS) whatever the window
length and stride; with non-overlapping windows each window's first token is context only and its bytes are not
counted. Without offsets (a slow tokenizer) bits per byte is ``None``.

Example:
    >>> from llmprune.eval.perplexity import load_text, perplexity
    >>> text = load_text("../shared/data/wikitext2-raw-test.txt")     # doctest: +SKIP
    >>> perplexity(model, tok, text, seq_len=256, max_tokens=60_000).ppl  # doctest: +SKIP
    287.71...
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmprune.calibration.calibrate import leading_bos
from llmprune.calibration.held_out import token_byte_lengths, window_nll
from llmprune.calibration.text import DATASET_ALIASES, load_text as _load_text

from ._checks import check_compatible, check_ids, max_positions, model_device

__all__ = ["DATASET_ALIASES", "PerplexityResult", "load_text", "perplexity", "tokenize_text", "token_bytes",
           "windows"]

#: Default window length when the model's context is longer (or unknown).
DEFAULT_MAX_SEQ_LEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    ``nll`` is the mean negative log-likelihood per scored token (nats), ``n_tokens`` the
    number of scored (predicted) tokens, ``n_input_tokens`` the tokens the windows were cut
    from, ``stride`` the window step (``seq_len`` for non-overlapping windows), ``n_bytes`` the
    UTF-8 bytes of text the scored tokens cover and ``bits_per_byte`` their total NLL in bits per
    such byte (both ``None`` without tokenizer offsets; see the module docstring).
    """

    ppl: float
    nll: float
    n_tokens: int
    seq_len: int
    n_windows: int
    stride: int
    n_input_tokens: int
    bits_per_byte: float | None = None
    n_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form. Example: ``json.dumps(result.to_dict())``."""
        return asdict(self)


def load_text(source: str | Path) -> str:
    """Text to score: a local file (UTF-8) or a dataset name ``wikitext2``, ``ptb``, ``c4`` (test split).

    A local file is read with universal newlines (``\\r\\n`` becomes ``\\n``) and used as is:
    the shared ``wikitext2-raw-test.txt`` is the WikiText-2 raw test split as plain lines.
    Names follow the papers (SparseGPT/Wanda): WikiText-2 rows joined with ``"\\n\\n"``
    (see :mod:`llmprune.calibration.text`, shared with ``--calib``).

    Raises ``FileNotFoundError`` for a missing file or an unreachable dataset and
    ``ValueError`` for an empty text.

    Example:
        >>> text = load_text("../shared/data/wikitext2-raw-test.txt")  # doctest: +SKIP
    """
    return _load_text(source, split="test", purpose="perplexity")


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise ``text`` once (special tokens included) and keep the first ``max_tokens`` ids.

    Example:
        >>> ids = tokenize_text(tok, "Hello world", max_tokens=10)  # doctest: +SKIP
    """
    if not text or not text.strip():
        raise ValueError("Perplexity text is empty; nothing to score.")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}.")
    enc = tokenizer(text, add_special_tokens=True, verbose=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids


def token_bytes(tokenizer: Any, text: str, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids of ``text`` (as :func:`tokenize_text`) and the UTF-8 bytes of text each token covers (the
    partition of the module docstring), or ``None`` for the bytes when the tokenizer gives no offsets.

    Example:
        >>> ids, nbytes = token_bytes(tok, "Hello world")  # doctest: +SKIP
        >>> int(nbytes.sum()) == len("Hello world".encode())  # doctest: +SKIP
        True
    """
    try:
        enc = tokenizer(text, add_special_tokens=True, verbose=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return tokenize_text(tokenizer, text, max_tokens), None
    if not text or not text.strip():
        raise ValueError("Perplexity text is empty; nothing to score.")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}.")
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if max_tokens is not None:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    return ids, token_byte_lengths(text, offsets)  # shared with --params' held-out loss per byte


def default_seq_len(model: torch.nn.Module) -> int:
    """The window used when none is given: the model's context length, capped at 2048."""
    return _resolve_seq_len(model, None)


def _resolve_seq_len(model: torch.nn.Module, seq_len: int | None, extra: int = 0) -> int:
    """The window length; ``extra`` positions (a prepended BOS) must fit beside it in the model's context."""
    limit = max_positions(model)
    if seq_len is None:
        return min((limit or DEFAULT_MAX_SEQ_LEN) - extra, DEFAULT_MAX_SEQ_LEN)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")
    if limit is not None and seq_len + extra > limit:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context length ({limit} positions"
            + (", one of them the BOS each window starts with" if extra else "") + f"); "
            f"use --seq-len {limit - extra} or less."
        )
    return seq_len


def windows(
    n_ids: int, seq_len: int, stride: int | None = None, drop_last: bool = True
) -> list[tuple[int, int, int]]:
    """Window plan as ``(start, end, first_scored)`` triples over ``n_ids`` tokens.

    Positions ``first_scored .. end-1`` of window ``[start, end)`` are predicted from the
    tokens before them in the window.

    Example:
        >>> windows(10, 4)
        [(0, 4, 1), (4, 8, 5)]
        >>> windows(10, 4, drop_last=False)
        [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
        >>> windows(10, 4, stride=2)
        [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    """
    if stride is None or stride == seq_len:
        plan = [(s, s + seq_len, s + 1) for s in range(0, n_ids - seq_len + 1, seq_len)]
        tail = len(plan) * seq_len
        if not drop_last and n_ids - tail >= 2:
            plan.append((tail, n_ids, tail + 1))
        return plan
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be between 1 and seq_len ({seq_len}), got {stride}.")
    plan = [(0, min(seq_len, n_ids), 1)]
    prev_end = plan[0][1]
    while prev_end < n_ids:
        end = min(prev_end + stride, n_ids)
        plan.append((max(0, end - seq_len), end, prev_end))
        prev_end = end
    return plan


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    seq_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    drop_last: bool = True,
    bos_every_window: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the protocol).

    ``seq_len`` defaults to the model's context length capped at 2048; ``device`` defaults
    to the model's device (the model is not moved). ``drop_last=False`` also scores the
    final partial window of non-overlapping windows (as the Hugging Face perplexity guide's
    loop does); the papers drop it (default). Works for fp32/bf16/fp16 models; the
    loss is always accumulated in float32/float64. ``batch_size`` windows run at once, fewer when
    their logits would pass 1 GiB (large vocabularies).

    Example:
        >>> r = perplexity(model, tok, text, seq_len=256, max_tokens=60_000)  # doctest: +SKIP
        >>> r.ppl, r.n_tokens, r.n_windows  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    check_compatible(model, tokenizer)
    bos = leading_bos(tokenizer) if bos_every_window else None
    seq_len = _resolve_seq_len(model, seq_len, extra=0 if bos is None else 1)
    ids, nbytes = token_bytes(tokenizer, text, max_tokens)
    check_ids(model, ids)
    if ids.numel() < seq_len:
        raise ValueError(
            f"The text has only {ids.numel()} tokens, fewer than one window of seq_len={seq_len}. "
            "Use a longer text, a smaller --seq-len, or a larger --max-tokens."
        )
    plan = windows(ids.numel(), seq_len, stride, drop_last)
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    bar = _progress(len(plan), progress)
    try:
        total_nll = window_nll(model, ids, plan, bos, batch_size, dev, on_batch=bar.update)
    finally:
        bar.close()
        model.train(was_training)
    total_tokens = sum(end - first for _, end, first in plan)
    nll = total_nll / total_tokens
    n_bytes = None if nbytes is None else int(sum(int(nbytes[first:end].sum()) for _, end, first in plan))
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        n_tokens=total_tokens,
        seq_len=seq_len,
        n_windows=len(plan),
        stride=seq_len if stride is None else stride,
        n_input_tokens=int(ids.numel()),
        bits_per_byte=total_nll / (math.log(2) * n_bytes) if n_bytes else None,
        n_bytes=n_bytes,
    )


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="perplexity", unit="win", disable=not enabled, leave=False)
