"""Adapter for Llama-style decoders: separate q/k/v/o projections and a SwiGLU gate/up/down MLP.

Covers Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q_norm/k_norm, shared across heads so
untouched by head pruning) and Gemma 2/3 text (extra norms, soft-capping, sliding/full ``layer_types``).
Attention modules infer the head count from tensor shapes (``view(..., -1, head_dim)``); only
``num_key_value_groups`` has to follow the pruned shapes.
"""

from __future__ import annotations

import math

from torch import nn

from .base import HEADS_DIVIDING_HIDDEN, ArchAdapter, AttentionSpec, FFNSpec, Slot, StandardEquivalent
from .registry import base_model_type, register_adapter

__all__ = ["LlamaAdapter"]


@register_adapter
class LlamaAdapter(ArchAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    family = "Llama / Mistral / Qwen2 / Qwen3 / Gemma 1-3"
    # Mistral is Llama without biases plus an optional sliding window, and its config accepts any head count
    # with an explicit head_dim: a head-pruned Llama that LlamaConfig rejects is saved as an exact Mistral.
    # Gemma has no such twin (scaled embeddings, (1 + w) norms, soft-capping), so it keeps llmprune_<type>.
    standard_equivalents = {
        "llama": StandardEquivalent("mistral", require={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
                                    set={"sliding_window": None}),
    }
    standard_outputs = {"llama": "all (head-pruned: as mistral)",
                        **{t: HEADS_DIVIDING_HIDDEN for t in ("gemma", "gemma2", "gemma3_text")}}
    units = ("heads", "kv_groups", "neurons", "layers", "hidden")
    # Every config here takes an explicit head_dim, so hidden_size can shrink under unchanged heads.
    hidden_refusal = None
    norm_weight_offsets = {t: 1.0 for t in ("gemma", "gemma2", "gemma3_text")}  # Gemma RMSNorm: x̂ * (1 + w)

    def rescale_embeddings(self, model: nn.Module, hidden_size: int) -> float:
        # Gemma's embedding multiplies by sqrt(config.hidden_size), a buffer rebuilt from the config on reload.
        emb = model.get_input_embeddings()
        if not hasattr(emb, "embed_scale"):
            return 1.0
        old = float(emb.scalar_embed_scale)
        new = math.sqrt(hidden_size)
        emb.scalar_embed_scale = new
        emb.embed_scale.fill_(new)
        return old / new

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        return base.layers

    def attention(self, layer: nn.Module) -> AttentionSpec:
        attn = layer.self_attn
        hd = attn.head_dim
        num_heads = attn.q_proj.out_features // hd
        num_kv = attn.k_proj.out_features // hd
        o_cols = Slot(attn.o_proj, "in", hd)
        return AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=hd,
            q_slots=[Slot(attn.q_proj, "out", hd), o_cols],
            kv_slots=[Slot(attn.k_proj, "out", hd), Slot(attn.v_proj, "out", hd)],
            output=o_cols,
        )

    def ffn(self, layer: nn.Module) -> FFNSpec:
        mlp = layer.mlp
        down = Slot(mlp.down_proj, "in")
        return FFNSpec(
            num_neurons=mlp.down_proj.in_features,
            slots=[Slot(mlp.gate_proj, "out"), Slot(mlp.up_proj, "out"), down],
            output=down,
        )

    def bias_flags(self, config):
        flags = {}
        attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        # Only these configs build o_proj / down_proj with a configurable bias in transformers 5.
        model_type = base_model_type(config.model_type)
        if model_type in ("llama", "qwen3", "gemma", "gemma2", "gemma3_text"):
            flags["attention"] = ("attention_bias", attn)
        if model_type == "llama":
            flags["ffn"] = ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
        return flags

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        attn = layer.self_attn
        attn.num_key_value_groups = num_heads // num_kv_heads if num_kv_heads else 1
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, num_heads)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = num_kv_heads

    def set_ffn_shape(self, layer: nn.Module, num_neurons: int) -> None:
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = num_neurons
