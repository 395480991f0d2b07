"""Adapter for GPT-NeoX / Pythia: per-head interleaved ``query_key_value`` and partial rotary embeddings.

``query_key_value`` output features are ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (``head_size`` each), so a
head's q, k and v rows are three slots with stride ``3 * head_size``. Rotary dims (``rotary_ndims``) are
per head and untouched. The attention infers the head count from shapes (``view(..., -1, 3 * head_size)``)
but derives ``head_size = hidden_size // num_attention_heads`` from the config, so head-pruned
checkpoints use the per-layer classes (``standard_config_ok``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import NO_HEAD_PRUNING, ArchAdapter, AttentionSpec, FFNSpec, Slot, heads_span_hidden
from .registry import register_adapter

__all__ = ["GPTNeoXAdapter"]


@register_adapter
class GPTNeoXAdapter(ArchAdapter):
    model_types = ("gpt_neox",)
    # head_dim = hidden_size // num_heads in the modules: head-pruned shapes need the per-layer classes
    standard_outputs = {t: NO_HEAD_PRUNING for t in model_types}
    family = "GPT-NeoX / Pythia"
    kv_heads_attr = None
    per_layer_config_lists = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, "gpt_neox", model).layers

    def attention(self, layer: nn.Module) -> AttentionSpec:
        attn = layer.attention
        hd = attn.head_size
        n = attn.dense.in_features // hd
        o_cols = Slot(attn.dense, "in", hd)
        qkv = attn.query_key_value
        return AttentionSpec(
            num_heads=n,
            num_kv_heads=n,
            head_dim=hd,
            q_slots=[Slot(qkv, "out", hd, offset=0, stride=3 * hd), o_cols],
            kv_slots=[Slot(qkv, "out", hd, offset=hd, stride=3 * hd), Slot(qkv, "out", hd, offset=2 * hd, stride=3 * hd)],
            output=o_cols,
        )

    def ffn(self, layer: nn.Module) -> FFNSpec:
        mlp = layer.mlp
        down = Slot(mlp.dense_4h_to_h, "in")
        return FFNSpec(num_neurons=mlp.dense_4h_to_h.in_features, slots=[Slot(mlp.dense_h_to_4h, "out"), down],
                       output=down)

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.num_attention_heads

    def standard_config_ok(self, model: nn.Module) -> bool:
        return heads_span_hidden(self, model)
