"""Helpers shared by the weight pruners and the activation-sparsity calibration (not public API)."""

from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn


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


