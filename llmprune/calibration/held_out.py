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
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .calibrate import leading_bos

__all__ = ["token_byte_lengths", "split_held_out", "TextLoss", "text_loss", "chars_per_token"]

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
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    batch_size = max(1, min(batch_size, _LOGITS_BYTES // (seq_len * max(1, vocab) * 4)))
    starts = list(range(0, n - 1, span - 1))  # window k's first token is window k-1's last
    nll = 0.0
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        pads = [int(bos is not None and int(ids[s]) != bos) for s in group]
        width = max(min(span, n - s) + p for s, p in zip(group, pads))
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (s, p) in enumerate(zip(group, pads)):
            window = ids[s:s + span]
            if p:
                inputs[row, 0] = bos
            inputs[row, p:p + len(window)] = window
            targets[row, p:p + len(window) - 1] = window[1:]
        logits = model(input_ids=inputs.to(device), use_cache=False).logits
        for row in range(len(group)):  # one row at a time keeps the float32 copy small
            mask = targets[row] != -100
            nll += float(nn.functional.cross_entropy(logits[row][mask.to(logits.device)].float(),
                                                     targets[row][mask].to(logits.device), reduction="sum"))
        del logits
    scored = int(nbytes[1:].sum()) if nbytes is not None else len(text.encode())
    return TextLoss(nll, n - 1, scored)
