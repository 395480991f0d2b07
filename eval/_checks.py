"""Input checks shared by the eval modules (model/tokenizer compatibility, devices).

Example:
    >>> from llmprune.eval._checks import model_device
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_compatible", "check_ids", "model_device", "model_vocab_size", "max_positions"]


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-less module).

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_vocab_size(model: torch.nn.Module) -> int | None:
    """Number of rows of the input embedding (the ids the model accepts), if known."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        emb = get()
        if emb is not None and hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "vocab_size", None)
    return int(size) if size is not None else None


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's context length (``max_position_embeddings`` or similar), if known."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_compatible(model: torch.nn.Module, tokenizer: Any) -> None:
    """Raise ``ValueError`` if the tokenizer can emit ids the model has no embedding for.

    Example:
        >>> check_compatible(model, tokenizer)  # doctest: +SKIP
    """
    vocab = model_vocab_size(model)
    if vocab is None:
        return
    n_tok = len(tokenizer)
    if n_tok > vocab:
        raise ValueError(
            f"Model/tokenizer mismatch: the tokenizer has {n_tok} tokens but the model's "
            f"embedding has only {vocab} rows. Load the tokenizer saved with this model "
            "(AutoTokenizer.from_pretrained(<model dir>))."
        )


def check_ids(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Raise ``ValueError`` if any token id is outside the model's embedding."""
    vocab = model_vocab_size(model)
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(
            f"Model/tokenizer mismatch: token id {int(ids.max())} is outside the model's "
            f"vocabulary of {vocab}. Use the tokenizer that belongs to this model."
        )
