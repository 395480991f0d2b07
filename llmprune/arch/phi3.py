"""Adapter for Phi-3 / Phi-3.5 (mini, medium): fused ``qkv_proj`` and fused ``gate_up_proj``.

``qkv_proj`` rows are ``[q heads | k heads | v heads]``; ``gate_up_proj`` rows are ``[gate | up]`` and the
MLP splits them with ``chunk(2)``, so removing neuron ``j`` from both halves keeps the split valid.
The attention module reads ``config.num_attention_heads`` to find where keys start in ``qkv_proj``; after
head pruning each attention gets a :class:`LayerConfigView` that reports its own head counts and
forwards everything else (``_attn_implementation`` included) to the shared model config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ArchAdapter, AttentionSpec, FFNSpec, Slot
from .registry import register_adapter

__all__ = ["Phi3Adapter", "LayerConfigView"]


class LayerConfigView:
    """A read-through view of a config with a few per-layer overrides (not saved; rebuilt on load)."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        if isinstance(base, LayerConfigView):
            overrides = {**base._overrides, **overrides}
            base = base._base
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = overrides

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name.startswith("__") or "_base" not in d:  # copy/pickle probe an empty instance
            raise AttributeError(name)
        if name in d["_overrides"]:
            return d["_overrides"][name]
        return getattr(d["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)


@register_adapter
class Phi3Adapter(ArchAdapter):
    model_types = ("phi3",)
    family = "Phi-3 / Phi-3.5"
    units = ("heads", "kv_groups", "neurons", "layers", "hidden")
    hidden_refusal = None  # Phi3Config honours an explicit head_dim

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, "model", model).layers

    def attention(self, layer: nn.Module) -> AttentionSpec:
        attn = layer.self_attn
        hd = attn.head_dim
        num_heads = attn.o_proj.in_features // hd
        num_kv = (attn.qkv_proj.out_features // hd - num_heads) // 2
        o_cols = Slot(attn.o_proj, "in", hd)
        return AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=hd,
            q_slots=[Slot(attn.qkv_proj, "out", hd), o_cols],
            kv_slots=[Slot(attn.qkv_proj, "out", hd, offset=num_heads * hd),
                      Slot(attn.qkv_proj, "out", hd, offset=(num_heads + num_kv) * hd)],
            output=o_cols,
        )

    def ffn(self, layer: nn.Module) -> FFNSpec:
        mlp = layer.mlp
        n = mlp.down_proj.in_features
        down = Slot(mlp.down_proj, "in")
        return FFNSpec(
            num_neurons=n,
            slots=[Slot(mlp.gate_up_proj, "out"), Slot(mlp.gate_up_proj, "out", offset=n), down],
            output=down,
        )

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        attn = layer.self_attn
        attn.num_key_value_groups = num_heads // num_kv_heads
        attn.num_key_value_heads = num_kv_heads
        attn.config = LayerConfigView(attn.config, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
