"""Adapter for BERT encoders (``BertModel`` and every ``BertFor*`` head, e.g. sentence-transformers'
all-MiniLM-L6-v2).

Layer ``i`` is ``encoder.layer[i]``: ``attention.self.{query,key,value}`` (with biases),
``attention.output.dense`` (head outputs enter the residual through its columns), then
``intermediate.dense`` -> activation -> ``output.dense``. Attention is multi-head (one key/value head
per query head), so a KV group is a single head and "heads" and "KV groups" coincide.

``BertSelfAttention`` reshapes with ``view(..., -1, attention_head_size)``, so the head count follows
the sliced weights; ``num_attention_heads`` / ``all_head_size`` are kept in sync anyway. The head size
is derived as ``hidden_size // num_attention_heads`` (no ``head_dim`` field), so a config with fewer
heads cannot describe the pruned model: head-pruned BERTs are saved with llmprune's per-layer config
(``model_type = "llmprune_bert"``, loadable with ``from_pretrained`` after ``import llmprune``);
FFN-only pruning stays a standard ``bert`` checkpoint.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import NO_HEAD_PRUNING, ArchAdapter, AttentionSpec, FFNSpec, Slot, heads_span_hidden
from .registry import register_adapter

__all__ = ["BertAdapter"]


@register_adapter
class BertAdapter(ArchAdapter):
    model_types = ("bert",)
    standard_outputs = {t: NO_HEAD_PRUNING for t in model_types}
    family = "BERT (encoder)"
    units = ("heads", "kv_groups", "neurons", "layers")
    kv_heads_attr = None
    per_layer_config_lists = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "base_model", model)  # BertModel for BertFor* heads, itself otherwise
        return base.encoder.layer

    def attention(self, layer: nn.Module) -> AttentionSpec:
        sa, out = layer.attention.self, layer.attention.output
        hd = sa.attention_head_size
        num_heads = sa.query.out_features // hd
        o_cols = Slot(out.dense, "in", hd)
        return AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=hd,
            q_slots=[Slot(sa.query, "out", hd), o_cols],
            kv_slots=[Slot(sa.key, "out", hd), Slot(sa.value, "out", hd)],
            output=o_cols,
        )

    def ffn(self, layer: nn.Module) -> FFNSpec:
        down = Slot(layer.output.dense, "in")
        return FFNSpec(num_neurons=layer.output.dense.in_features,
                       slots=[Slot(layer.intermediate.dense, "out"), down], output=down)

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        sa = layer.attention.self
        sa.num_attention_heads = num_heads
        sa.all_head_size = num_heads * sa.attention_head_size

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.num_attention_heads

    def standard_config_ok(self, model: nn.Module) -> bool:
        # BERT derives head size as hidden_size // num_attention_heads: only unpruned heads fit a standard config.
        return heads_span_hidden(self, model)
