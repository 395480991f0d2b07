"""Adapters for mixture-of-experts decoders with batched experts: Qwen3-MoE and Mixtral (transformers 5).

Both families store a layer's experts as two batched parameters on ``mlp.experts``:
``gate_up_proj [num_experts, 2*I, H]`` (gate rows ``[0, I)``, up rows ``[I, 2I)``) and
``down_proj [num_experts, H, I]``, and route with ``mlp.gate`` (a ``[num_experts, H]`` weight):
softmax over all experts, top-k, optional renormalisation of the k weights (always in Mixtral,
``norm_topk_prob`` in Qwen3-MoE). Attention is Llama-style (Qwen3-MoE adds per-head q/k norms).

Prunable units: heads / KV groups and layers as in Llama; *expert neurons* (each expert keeps its own
neurons, the same count in every expert of a layer, since experts share one batched width); whole
*experts* (expert parameters sliced along the expert axis and the router's rows removed, so a removed
expert leaves the softmax and the top-k); and the dense MLP neurons of Qwen3-MoE's ``mlp_only_layers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ExpertParam, ExpertsSpec, Slot, expert_view
from .llama import LlamaAdapter
from .registry import register_adapter

__all__ = ["Qwen3MoeAdapter", "MixtralAdapter"]


@register_adapter
class Qwen3MoeAdapter(LlamaAdapter):
    model_types = ("qwen3_moe",)
    family = "Qwen3-MoE"
    units = ("heads", "kv_groups", "neurons", "layers", "experts", "hidden")
    per_layer_config_lists = ("layer_types",)
    #: config attribute holding the expert count and each expert's width
    experts_attr = "num_experts"
    expert_ffn_attr = "moe_intermediate_size"

    def ffn(self, layer: nn.Module):
        # Dense MLP only (Qwen3-MoE's mlp_only_layers); MoE layers are described by experts().
        return super().ffn(layer) if hasattr(layer.mlp, "down_proj") and isinstance(layer.mlp.down_proj, nn.Linear) else None

    def experts(self, layer: nn.Module) -> ExpertsSpec | None:
        block = layer.mlp
        if not hasattr(block, "experts"):
            return None
        ex = block.experts
        num_experts, two_i, _ = ex.gate_up_proj.shape
        inter = two_i // 2
        return ExpertsSpec(
            num_experts=num_experts,
            num_neurons=inter,
            top_k=int(block.gate.top_k),
            params=[ExpertParam(ex, "gate_up_proj", "out", (0, inter)), ExpertParam(ex, "down_proj", "in")],
            router=Slot(block.gate, "out"),
        )

    def set_experts_shape(self, layer: nn.Module, num_experts: int, num_neurons: int) -> None:
        block = layer.mlp
        block.experts.num_experts = num_experts
        block.experts.intermediate_dim = num_neurons
        block.gate.num_experts = num_experts
        # Fewer experts than top_k: the masked original would route the extra slots to -inf logits,
        # i.e. weight 0, so lowering top_k to what is left is exact.
        block.gate.top_k = min(int(block.gate.top_k), num_experts)
        if hasattr(block, "top_k"):
            block.top_k = block.gate.top_k

    def calibration_hooks(self, layer: nn.Module, stats: Any) -> list[Any]:
        """Router statistics (routing mass per expert) and per-expert input statistics for Wanda."""
        from ..core.stats import InputStats

        spec = self.experts(layer)
        if spec is None:
            return []
        block, ex = layer.mlp, layer.mlp.experts
        hidden = ex.gate_up_proj.shape[2]
        for e in range(spec.num_experts):  # experts no token reaches get zero statistics, not an error
            for name, width in (("gate_up_proj", hidden), ("down_proj", spec.num_neurons)):
                stats.inputs[expert_view(ex, name, e)] = InputStats(
                    0, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))
        stats.extra["router_mass"] = torch.zeros(spec.num_experts, dtype=torch.float64)
        stats.extra["router_tokens"] = 0

        def on_router(module: nn.Module, args: Any, out: Any) -> None:
            _, weights, index = out
            stats.extra["router_mass"].index_add_(0, index.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
            stats.extra["router_tokens"] += index.shape[0]

        def on_experts(module: nn.Module, args: Any, kwargs: Any) -> None:
            x, index = args[0], args[1]
            for e in range(module.gate_up_proj.shape[0]):
                tokens = (index == e).any(dim=-1).nonzero().reshape(-1)
                if tokens.numel() == 0:
                    continue
                xe = x[tokens]
                gate, up = nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
                stats.inputs[expert_view(module, "gate_up_proj", e)].update(xe)
                stats.inputs[expert_view(module, "down_proj", e)].update(module.act_fn(gate) * up)

        return [block.gate.register_forward_hook(on_router),
                ex.register_forward_pre_hook(on_experts, with_kwargs=True)]

    # ---- config ----------------------------------------------------------------------------------
    def set_uniform_widths(self, config: Any, widths: dict[str, int]) -> None:
        neurons = widths["neurons"] or getattr(config, self.ffn_attr)  # 0: no dense MLP layer left
        self.set_uniform_config(config, widths["heads"], widths["kv_heads"], neurons)
        if widths.get("experts"):
            setattr(config, self.experts_attr, widths["experts"])
            setattr(config, self.expert_ffn_attr, widths["expert_neurons"])
            config.num_experts_per_tok = min(int(config.num_experts_per_tok), widths["experts"])

    def set_num_layers(self, config: Any, kept: list[int]) -> None:
        # Which layers are dense follows from mlp_only_layers and decoder_sparse_step; make it explicit.
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        was_dense = [i in dense or (i + 1) % step != 0 for i in kept]
        super().set_num_layers(config, kept)
        if hasattr(config, "mlp_only_layers"):
            config.mlp_only_layers = [j for j, d in enumerate(was_dense) if d]
            config.decoder_sparse_step = 1


@register_adapter
class MixtralAdapter(Qwen3MoeAdapter):
    model_types = ("mixtral",)
    family = "Mixtral"
    experts_attr = "num_local_experts"
    expert_ffn_attr = "intermediate_size"

    def ffn(self, layer: nn.Module):
        return None  # every Mixtral layer is a mixture of experts

    def set_uniform_widths(self, config: Any, widths: dict[str, int]) -> None:
        self.set_uniform_config(config, widths["heads"], widths["kv_heads"], getattr(config, self.ffn_attr))
        if widths.get("experts"):
            setattr(config, self.experts_attr, widths["experts"])
            setattr(config, self.expert_ffn_attr, widths["expert_neurons"])
            config.num_experts_per_tok = min(int(config.num_experts_per_tok), widths["experts"])
