"""Helpers shared by the weight pruners and the activation-sparsity calibration (not public API)."""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Sequence

import torch
from torch import nn

from ..calibrate import CalibrationError, calibration_batches, read_calibration_text

#: every linear layer inside the decoder blocks (lm_head and embeddings are never targets)
DEFAULT_TARGETS: tuple[str, ...] = ("*",)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 style, weight stored ``[in, out]``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matches(full_name: str, rel_name: str, patterns: Sequence[str]) -> bool:
    """A module matches if its full name (``model.layers.0.mlp.down_proj``) or its name inside the decoder
    layer (``mlp.down_proj``) matches any fnmatch pattern."""
    return any(fnmatch.fnmatchcase(full_name, p) or fnmatch.fnmatchcase(rel_name, p) for p in patterns)


def layer_targets(model: nn.Module, layers: Sequence[nn.Module], patterns: Sequence[str]) -> list[list[tuple[str, nn.Module]]]:
    """Per decoder layer, the ``(full name, module)`` of its linear layers matching ``patterns``."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in layers:
        prefix = names.get(id(layer), "")
        found = []
        for rel, mod in layer.named_modules():
            if rel and is_linear(mod):
                full = f"{prefix}.{rel}" if prefix else rel
                if matches(full, rel, patterns):
                    found.append((full, mod))
        out.append(found)
    return out


def as_batches(calibration: Any, tokenizer: Any, n_samples: int, seq_len: int, seed: int,
               batch_size: int) -> list[torch.Tensor] | None:
    """Calibration given as a text file path, raw text (``str`` containing whitespace and no such file),
    a ``[n, seq_len]`` tensor of token ids, or a sequence of such batches."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        if tokenizer is None:
            raise CalibrationError("calibration from text needs the model's tokenizer (tokenizer=...)")
        path = os.fspath(calibration)
        if os.path.isfile(path) or "\n" not in path and len(path) < 4096 and " " not in path:
            text = read_calibration_text(path)
        else:
            text = path
        return calibration_batches(tokenizer, text, n_samples, seq_len, seed, batch_size)
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        return list(calibration.split(batch_size))
    batches = list(calibration)
    if not batches:
        raise CalibrationError("calibration data is empty")
    return batches
