"""Adapter for Falcon: fused ``query_key_value`` in three layouts, parallel attention, ``FalconLinear``.

``query_key_value`` output features (``hd`` = head_dim, ``g`` = query heads per KV head):

- ``new_decoder_architecture`` (Falcon-40B/180B, GQA): per KV group ``[q_0 .. q_{g-1}, k, v]``, i.e.
  blocks of ``(g + 2) * hd``; query heads are a blocked :class:`Slot` (``group=g``);
- ``multi_query`` (Falcon-7B): ``[q_0 .. q_{n-1}, k, v]`` with one shared KV head;
- neither: per head ``[q_h, k_h, v_h]`` (multi-head, like GPT-NeoX).

The modules derive ``head_dim = hidden_size // num_attention_heads`` (``FalconConfig.head_dim`` is a
read-only property), so head-pruned checkpoints use the per-layer classes (``standard_config_ok``).
ALiBi models (``alibi=True``) build per-head slopes from the model-wide head count, so their heads are
not prunable here (``attention`` returns ``None``); neurons and layers still are.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import NO_HEAD_PRUNING, ArchAdapter, AttentionSpec, FFNSpec, Slot, heads_span_hidden
from .registry import register_adapter

__all__ = ["FalconAdapter"]


@register_adapter
class FalconAdapter(ArchAdapter):
    model_types = ("falcon",)
    # head_dim = hidden_size // num_heads in the modules: head-pruned shapes need the per-layer classes
    standard_outputs = {t: NO_HEAD_PRUNING for t in model_types}
    family = "Falcon"
    kv_heads_attr = "num_kv_heads"
    ffn_attr = "ffn_hidden_size"
    per_layer_config_lists = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, "transformer", model).h

    def attention(self, layer: nn.Module) -> AttentionSpec | None:
        attn = layer.self_attention
        if attn.config.alibi:
            return None
        hd = attn.head_dim
        qkv = attn.query_key_value
        n = attn.dense.in_features // hd
        o_cols = Slot(attn.dense, "in", hd)
        if attn.new_decoder_architecture:
            kv = qkv.out_features // hd - n
            kv //= 2
            g = n // kv
            block = (g + 2) * hd
            q = Slot(qkv, "out", hd, stride=hd, group=g, group_stride=block)
            kv_slots = [Slot(qkv, "out", hd, offset=g * hd, stride=block),
                        Slot(qkv, "out", hd, offset=(g + 1) * hd, stride=block)]
        elif attn.multi_query:
            kv = 1
            q = Slot(qkv, "out", hd)
            kv_slots = [Slot(qkv, "out", hd, offset=n * hd), Slot(qkv, "out", hd, offset=(n + 1) * hd)]
        else:
            kv = n
            q = Slot(qkv, "out", hd, stride=3 * hd)
            kv_slots = [Slot(qkv, "out", hd, offset=hd, stride=3 * hd), Slot(qkv, "out", hd, offset=2 * hd, stride=3 * hd)]
        return AttentionSpec(num_heads=n, num_kv_heads=kv, head_dim=hd, q_slots=[q, o_cols], kv_slots=kv_slots,
                             output=o_cols)

    def ffn(self, layer: nn.Module) -> FFNSpec:
        mlp = layer.mlp
        down = Slot(mlp.dense_4h_to_h, "in")
        return FFNSpec(num_neurons=mlp.dense_4h_to_h.in_features, slots=[Slot(mlp.dense_h_to_4h, "out"), down],
                       output=down)

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        attn = layer.self_attention
        attn.num_heads = num_heads
        attn.num_kv_heads = num_kv_heads
        attn.num_key_value_groups = num_heads // num_kv_heads  # transformers >= 5.25 repeats K/V by it
        attn.split_size = num_heads * attn.head_dim
        layer.num_heads = num_heads

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.num_attention_heads

    def pin_head_dim(self, config: Any) -> None:
        pass  # FalconConfig.head_dim is derived from the (unchanged) upper-bound head count

    def set_uniform_config(self, config: Any, num_heads: int, num_kv_heads: int, num_neurons: int) -> None:
        # Only reached without head pruning (standard_config_ok); head_dim is a read-only property.
        config.num_attention_heads = num_heads
        if config.new_decoder_architecture or not config.multi_query:
            config.num_kv_heads = num_kv_heads
        config.ffn_hidden_size = num_neurons

    def standard_config_ok(self, model: nn.Module) -> bool:
        return heads_span_hidden(self, model)
