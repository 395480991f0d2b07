"""Adapter for GPT-2: ``Conv1D`` projections (weights stored ``[in, out]``), fused ``c_attn``, biases.

``c_attn`` output features are ``[q | k | v]``, each ``num_heads * head_dim`` wide; every head is its own
KV head (multi-head attention). The modules derive ``head_dim = n_embd // n_head`` from the config, so
a head-pruned model cannot be described by a standard ``GPT2Config``: such checkpoints always use the
per-layer classes (``standard_config_ok``). FFN-only pruning stays a plain ``gpt2`` checkpoint (``n_inner``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import NO_HEAD_PRUNING, ArchAdapter, AttentionSpec, FFNSpec, Slot, heads_span_hidden, weight_matrix
from .registry import register_adapter

__all__ = ["GPT2Adapter"]


@register_adapter
class GPT2Adapter(ArchAdapter):
    model_types = ("gpt2",)
    # head_dim = hidden_size // num_heads in the modules: head-pruned shapes need the per-layer classes
    standard_outputs = {t: NO_HEAD_PRUNING for t in model_types}
    family = "GPT-2"
    heads_attr = "n_head"
    kv_heads_attr = None
    ffn_attr = "n_inner"
    layers_attr = "n_layer"
    per_layer_config_lists = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, "transformer", model).h

    def attention(self, layer: nn.Module) -> AttentionSpec:
        attn = layer.attn
        hd = attn.head_dim
        width = weight_matrix(attn.c_proj).shape[1]  # num_heads * head_dim
        o_cols = Slot(attn.c_proj, "in", hd)
        return AttentionSpec(
            num_heads=width // hd,
            num_kv_heads=width // hd,
            head_dim=hd,
            q_slots=[Slot(attn.c_attn, "out", hd), o_cols],
            kv_slots=[Slot(attn.c_attn, "out", hd, offset=width), Slot(attn.c_attn, "out", hd, offset=2 * width)],
            output=o_cols,
        )

    def ffn(self, layer: nn.Module) -> FFNSpec:
        mlp = layer.mlp
        down = Slot(mlp.c_proj, "in")
        return FFNSpec(num_neurons=weight_matrix(mlp.c_proj).shape[1], slots=[Slot(mlp.c_fc, "out"), down], output=down)

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        attn = layer.attn
        attn.num_heads = num_heads
        attn.split_size = num_heads * attn.head_dim  # c_attn(...).split(split_size) -> q, k, v

    def set_layer_index(self, layer: nn.Module, index: int) -> None:
        attn = layer.attn
        if attn.scale_attn_by_inverse_layer_idx and attn.layer_idx != index:
            # scaling 1/(layer_idx+1) is baked in at construction; a reloaded model would rescale.
            raise ValueError("layer removal is not supported for GPT-2 models with scale_attn_by_inverse_layer_idx=True")
        super().set_layer_index(layer, index)

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.n_head

    def standard_config_ok(self, model: nn.Module) -> bool:
        return heads_span_hidden(self, model)
