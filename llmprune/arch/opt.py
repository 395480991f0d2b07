"""Adapter for OPT: separate q/k/v/out projections and ``fc1``/``fc2`` on the decoder layer, with biases.

Covers both ``do_layer_norm_before`` variants (the norms are untouched by pruning) and models with
``word_embed_proj_dim != hidden_size`` (``project_in``/``project_out`` are outside the layers).
The attention views its states with ``self.num_heads`` and derives ``head_dim = hidden_size // num_heads``
from the config, so head-pruned checkpoints use the per-layer classes (``standard_config_ok``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import NO_HEAD_PRUNING, ArchAdapter, AttentionSpec, FFNSpec, Slot, heads_span_hidden
from .registry import register_adapter

__all__ = ["OPTAdapter"]


@register_adapter
class OPTAdapter(ArchAdapter):
    model_types = ("opt",)
    # head_dim = hidden_size // num_heads in the modules: head-pruned shapes need the per-layer classes
    standard_outputs = {t: NO_HEAD_PRUNING for t in model_types}
    family = "OPT"
    kv_heads_attr = None
    ffn_attr = "ffn_dim"
    per_layer_config_lists = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        return getattr(base, "decoder", base).layers

    def attention(self, layer: nn.Module) -> AttentionSpec:
        attn = layer.self_attn
        hd = attn.head_dim
        n = attn.q_proj.out_features // hd
        o_cols = Slot(attn.out_proj, "in", hd)
        return AttentionSpec(
            num_heads=n,
            num_kv_heads=n,
            head_dim=hd,
            q_slots=[Slot(attn.q_proj, "out", hd), o_cols],
            kv_slots=[Slot(attn.k_proj, "out", hd), Slot(attn.v_proj, "out", hd)],
            output=o_cols,
        )

    def ffn(self, layer: nn.Module) -> FFNSpec:
        down = Slot(layer.fc2, "in")
        return FFNSpec(num_neurons=layer.fc2.in_features, slots=[Slot(layer.fc1, "out"), down], output=down)

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        layer.self_attn.num_heads = num_heads

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.num_attention_heads

    def standard_config_ok(self, model: nn.Module) -> bool:
        return heads_span_hidden(self, model)
