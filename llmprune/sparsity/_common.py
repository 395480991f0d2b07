"""Helpers shared by the weight pruners and the activation-sparsity calibration (not public API)."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..calibration.calibrate import CalibrationError


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


@torch.no_grad()
def prune_by_input_norm(mask: Callable[..., torch.Tensor], weight: torch.Tensor, stats: Any, sparsity: float,
                        config: Any) -> None:
    """The registered ``prune`` of a mask from weights and input norms (wanda, ria): zero the weights ``mask``
    drops, in place (``stats``: ``InputStats``)."""
    if stats.count == 0:
        raise CalibrationError(f"no calibration inputs reached the layer with weight {list(weight.shape)}")
    keep = mask(weight, stats.norm, sparsity, nm=config.nm, per=config.per)
    weight.mul_(keep.to(weight.device, weight.dtype))
