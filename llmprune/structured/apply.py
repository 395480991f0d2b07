"""Applying a whole :class:`~llmprune.core.config.PrunePlan` to a model: its layers cut (:mod:`.surgery`),
removed, and the config made per-layer where widths differ (:mod:`.perlayer`)."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchAdapter, get_adapter
from ..core.config import PrunePlan
from ..checkpoint.perlayer import set_config_widths
from ..arch.surgery import prune_layer, remove_layers

__all__ = ["apply_plan"]


def apply_plan(model: nn.Module, plan: PrunePlan, adapter: ArchAdapter | None = None) -> nn.Module:
    """Apply ``plan`` in place and update ``model.config``; returns ``model``.

    Hidden channels (``plan.kept_hidden``) go first, then layers are pruned (indices refer to the original
    layers), then removed, then vocabulary rows (``plan.kept_tokens``; the tokenizer is not rewritten here:
    :func:`llmprune.checkpoint.tokenizer_prune.prune_tokenizer`). If all layers end up
    with the same widths the config stays standard; otherwise it becomes llmprune's per-layer config
    (see :mod:`llmprune.checkpoint.perlayer`).
    """
    adapter = adapter or get_adapter(model)
    if plan.kept_hidden is not None:  # channel indices are the same in every layer: cut them first
        from .hidden import prune_hidden

        prune_hidden(model, adapter, plan.kept_hidden, plan.hidden_norm_scales)
    layers = adapter.decoder_layers(model)
    if plan.layers and len(plan.layers) != len(layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {len(layers)}")
    with torch.no_grad():
        for i, layer_plan in enumerate(plan.layers):
            if i not in set(plan.removed_layers):
                prune_layer(adapter, layers[i], layer_plan)
        remove_layers(model, adapter, plan.removed_layers)
    set_config_widths(model, adapter)
    if plan.kept_tokens is not None:  # rows of the embedding and LM head: independent of the rest
        from .vocab import prune_vocab

        prune_vocab(model, plan.kept_tokens)
    return model
