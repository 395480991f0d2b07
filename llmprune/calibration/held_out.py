"""Held-out calibration text, and a model's loss on it per byte of text (comparable across tokenizers).

Two tokenizers cut the same text into different numbers of tokens, so a per-token loss favours the one that
cuts it finer. Per byte of text it does not: the total next-token loss (nats) of the text's tokens divided by the
UTF-8 bytes those tokens cover is the same quantity whichever tokenizer cut it. ``--params`` compares candidates
that prune the vocabulary (and so rewrite the tokenizer) with candidates that do not on this measure
(:mod:`llmprune.structured.budget`).

Example::

    calib, held = split_held_out(text, held_chars=20_000)      # disjoint parts of the calibration text
    loss = text_loss(model, tok, held, seq_len=256)
    loss.per_byte                                                # nats per byte of ``held``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .calibrate import leading_bos

__all__ = ["token_byte_lengths", "split_held_out", "TextLoss", "text_loss", "window_nll", "chars_per_token"]

#: at most this many bytes of float32 logits at once: fewer windows per batch at large vocabularies
_LOGITS_BYTES = 1 << 30


def token_byte_lengths(text: str, offsets: Sequence[Sequence[int]] | np.ndarray) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` each token covers, from the tokenizer's character ``offsets`` (``[n, 2]``):
    token ``i`` covers the bytes after the end of the tokens before it, up to the end of its own span, so the
    tokens partition the text (a trimmed space belongs to the token after it; special tokens cover nothing).

    Example::

        enc = tok(text, return_offsets_mapping=True)
        int(token_byte_lengths(text, enc["offset_mapping"]).sum()) == len(text.encode())    # True
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)  # UTF-8 bytes per char
    prefix = np.concatenate([[0], np.cumsum(width)])
    if not len(offsets):
        return torch.zeros(0, dtype=torch.long)
    covered = np.maximum.accumulate(prefix[np.clip(offsets[:, 1], 0, len(codes))])
    return torch.from_numpy(np.diff(np.concatenate([[0], covered])))


def _line_start(text: str, at: int, limit: int) -> int:
    """The first line start at or after ``at`` and before ``limit``; ``at`` when there is none."""
    if at <= 0 or text[at - 1] == "\n":
        return max(0, at)
    cut = text.find("\n", at, limit)
    return cut + 1 if cut >= 0 else at


def _piece_start(text: str, lo: int, hi: int, per: int) -> int:
    """Where the held-out piece of segment ``[lo, hi)`` starts: ``per`` characters before ``hi``, moved to the
    nearest line start within ``per / 2`` of it (a line longer than that is cut where it falls)."""
    at = hi - per
    if at <= lo:
        return lo
    options = []
    before = text.rfind("\n", lo, at)
    if before >= 0 or lo == 0 or text[lo - 1] == "\n":
        options.append(before + 1 if before >= 0 else lo)
    after = text.find("\n", at, hi - 1)  # not the segment's own last newline: that would hold out nothing
    if after >= 0:
        options.append(after + 1)
    near = [s for s in options if abs(s - at) <= per // 2]
    return min(near, key=lambda s: abs(s - at)) if near else at


def split_held_out(text: str, held_chars: int, pieces: int = 8) -> tuple[str, str]:
    """Split ``text`` into ``(calibration, held_out)``: ``text`` is cut into ``pieces`` equal segments (at line
    starts where there are some) and about the last ``held_chars / pieces`` characters of each (from the nearest
    line start) are held out, so a text that concatenates corpora is held out from each in proportion. The two parts
    are disjoint and together are the whole text (each part's pieces joined as they were). Pure: the same text
    gives the same split.

    Example::

        calib, held = split_held_out("a\\nb\\nc\\nd\\n", held_chars=4, pieces=2)     # ("a\\nc\\n", "b\\nd\\n")
    """
    n = len(text)
    if held_chars <= 0 or n == 0:
        return text, ""
    pieces = max(1, min(pieces, held_chars, n))
    per = max(1, min(held_chars, n) // pieces)
    bounds = [_line_start(text, k * n // pieces, (k + 1) * n // pieces) if k else 0 for k in range(pieces)] + [n]
    calib, held = [], []
    for lo, hi in zip(bounds, bounds[1:]):
        start = _piece_start(text, lo, hi, per)
        calib.append(text[lo:start])
        held.append(text[start:hi])
    return "".join(calib), "".join(held)


def chars_per_token(tokenizer: Any, text: str, sample_chars: int = 100_000) -> float:
    """Characters per token of ``text`` under ``tokenizer``, measured on its first ``sample_chars`` characters."""
    sample = text[:sample_chars]
    ids = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
    return len(sample) / max(1, len(ids))


@dataclass(frozen=True)
class TextLoss:
    """The next-token loss of one text: ``nll`` (nats, summed over the scored tokens), ``n_tokens`` scored and the
    UTF-8 bytes of text they cover, ``n_bytes``."""

    nll: float
    n_tokens: int
    n_bytes: int

    @property
    def per_byte(self) -> float:
        """Nats per byte of text: comparable across tokenizers."""
        return self.nll / max(1, self.n_bytes)

    @property
    def per_token(self) -> float:
        """Nats per scored token (depends on how the tokenizer cuts the text)."""
        return self.nll / max(1, self.n_tokens)


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, plan: Sequence[tuple[int, int, int]], bos: int | None,
               batch_size: int = 8, device: Any = None, on_batch: Callable[[int], None] | None = None) -> float:
    """The summed next-token NLL (nats, float32 losses) of ``ids`` over the windows ``plan``: ``(start, end,
    first)`` triples whose positions ``first .. end-1`` are predicted from the tokens before them in the window.
    With ``bos``, a window that does not start with it is read after it, as context only. ``batch_size`` windows run
    at once, fewer when their float32 logits would pass 1 GiB; ``on_batch(n)`` after each batch of ``n`` windows.
    Perplexity (``llmprune.eval``) and the held-out loss of ``--params`` score their windows here.

    Example::

        window_nll(model, ids, [(0, 64, 1), (63, 127, 64)], bos=None)    # every token but the first, once
    """
    if not plan:
        return 0.0
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab:  # a batch's logits are [batch, width, vocab]: at a 262k vocabulary 8 windows of 512 are 4 GB
        longest = max(end - start for start, end, _ in plan) + (bos is not None)
        batch_size = max(1, min(batch_size, _LOGITS_BYTES // (longest * vocab * 4)))
    total = 0.0
    for i in range(0, len(plan), batch_size):
        batch = plan[i:i + batch_size]
        pad = [int(bos is not None and int(ids[start]) != bos) for start, _, _ in batch]
        width = max(end - start + p for (start, end, _), p in zip(batch, pad))
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, ((start, end, first), p) in enumerate(zip(batch, pad)):
            if p:
                inputs[row, 0] = bos
            inputs[row, p:p + end - start] = ids[start:end]
            # position q predicts token q+1: the target at p + (j - start - 1) is ids[j]
            targets[row, p + first - start - 1:p + end - start - 1] = ids[first:end]
        logits = model(input_ids=inputs.to(dev), use_cache=False).logits
        targets = targets.to(logits.device)
        for row in range(len(batch)):  # one row at a time keeps the float32 copy small
            mask = targets[row] != -100
            total += float(nn.functional.cross_entropy(logits[row][mask].float(), targets[row][mask], reduction="sum"))
        del logits
        if on_batch is not None:
            on_batch(len(batch))
    return total


@torch.no_grad()
def text_loss(model: nn.Module, tokenizer: Any, text: str, seq_len: int, batch_size: int = 8) -> TextLoss:
    """``model``'s next-token loss on ``text`` tokenized by ``tokenizer`` (its special tokens included, e.g. BOS).
    Windows of ``seq_len`` positions overlap by one token, so every token but the first is scored exactly once and
    the scored bytes are the whole text but the first token's (none when it is BOS). When the tokenizer starts every
    text with a BOS (:func:`~.calibrate.leading_bos`), every window after the first starts with it too, as context
    only, as the calibration windows do. Without tokenizer offsets (a slow tokenizer) the scored tokens are taken to
    cover the whole text. ``batch_size`` windows run at once, fewer when their logits would pass 1 GiB.

    Example::

        text_loss(model, tok, held_text, seq_len=256).per_byte
    """
    try:
        enc = tokenizer(text, add_special_tokens=True, verbose=False, return_offsets_mapping=True)
        nbytes = token_byte_lengths(text, enc["offset_mapping"])
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers have no offsets
        enc, nbytes = tokenizer(text, add_special_tokens=True, verbose=False), None
    ids = torch.as_tensor(enc["input_ids"], dtype=torch.long)
    bos = leading_bos(tokenizer)
    span = seq_len - (bos is not None)  # text tokens per window, beside the BOS
    n = ids.numel()
    if n < 2 or span < 2:
        return TextLoss(0.0, 0, 0)
    # window k's first token is window k-1's last: every token but the first is scored once
    plan = [(s, min(s + span, n), s + 1) for s in range(0, n - 1, span - 1)]
    nll = window_nll(model, ids, plan, bos, batch_size)
    scored = int(nbytes[1:].sum()) if nbytes is not None else len(text.encode())
    return TextLoss(nll, n - 1, scored)
