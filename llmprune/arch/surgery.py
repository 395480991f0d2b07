"""Physical removal of heads, KV heads, neurons and layers: every weight edit happens here.

:func:`apply_plan` slices weights (and biases) of each layer according to a :class:`PrunePlan`, updates
module attributes through the adapter, removes whole layers with renumbering, and writes the new
widths into the config (a standard config when all layers agree, per-layer widths otherwise).

Example::

    apply_plan(model, plan)      # in place; model.config now describes the smaller model
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

from .base import ArchAdapter, ExpertsSpec, _is_conv1d, set_weight_matrix, weight_matrix
from ..core.config import LayerPlan
from .registry import get_adapter

__all__ = ["slice_module", "prune_experts", "prune_layer", "remove_layers", "layer_widths", "widths_by_kind",
           "count_parameters"]


def slice_module(module: nn.Module, dim: str, keep: torch.Tensor) -> None:
    """Keep only indices ``keep`` of ``module``'s output (``"out"``) or input (``"in"``) features."""
    keep = keep.to(module.weight.device)
    w = weight_matrix(module)
    if dim == "out":
        set_weight_matrix(module, w.index_select(0, keep))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            module.bias = nn.Parameter(bias.index_select(0, keep).contiguous(), requires_grad=bias.requires_grad)
    else:
        set_weight_matrix(module, w.index_select(1, keep))
    out_f, in_f = weight_matrix(module).shape
    if _is_conv1d(module):
        module.nf = out_f
    else:
        for name, value in (("out_features", out_f), ("in_features", in_f)):
            if hasattr(module, name):
                setattr(module, name, value)


def _set_param(module: nn.Module, name: str, data: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(data.contiguous(), requires_grad=old.requires_grad))


def prune_experts(spec: ExpertsSpec, kept_experts: Sequence[int] | None,
                  kept_neurons: Sequence[Sequence[int]] | None) -> tuple[int, int]:
    """Slice a mixture-of-experts block in place; returns the new ``(num_experts, num_neurons)``.

    ``kept_neurons[e]`` are the neurons kept in original expert ``e`` (same count for every expert, as
    the experts share batched parameters). Removing experts slices every expert parameter along axis 0
    and the router's output rows, so a removed expert no longer takes part in the softmax or the top-k.
    """
    num_experts, num_neurons = spec.num_experts, spec.num_neurons
    if kept_neurons is not None:
        if len(kept_neurons) != spec.num_experts:
            raise ValueError(f"kept_expert_neurons has {len(kept_neurons)} entries for {spec.num_experts} experts")
        counts = {len(k) for k in kept_neurons}
        if len(counts) != 1 or 0 in counts:
            raise ValueError("every expert must keep the same, non-zero number of neurons")
        num_neurons = counts.pop()
        keep = torch.as_tensor([list(k) for k in kept_neurons], dtype=torch.long, device="cpu")  # [E, k]
        for p in spec.params:
            w = getattr(p.module, p.name)  # [E, out, in]
            idx = torch.cat([keep + off for off in p.offsets], dim=1).to(w.device)  # [E, k * len(offsets)]
            axis = 1 if p.dim == "out" else 2
            shape = [w.shape[0], w.shape[1], w.shape[2]]
            shape[axis] = idx.shape[1]
            idx = idx.unsqueeze(2) if axis == 1 else idx.unsqueeze(1)
            _set_param(p.module, p.name, w.gather(axis, idx.expand(*shape)))
    if kept_experts is not None:
        if not kept_experts:
            raise ValueError("a mixture-of-experts layer must keep at least one expert")
        keep_e = torch.as_tensor(list(kept_experts), dtype=torch.long, device="cpu")
        for p in spec.params:
            w = getattr(p.module, p.name)
            _set_param(p.module, p.name, w.index_select(0, keep_e.to(w.device)))
        slice_module(spec.router.module, spec.router.dim, spec.router.indices(keep_e))
        num_experts = len(kept_experts)
    return num_experts, num_neurons


def _complement(kept: Sequence[int], n: int) -> list[int]:
    keep = set(kept)
    return [i for i in range(n) if i not in keep]


def prune_layer(adapter: ArchAdapter, layer: nn.Module, plan: LayerPlan) -> None:
    """Slice one layer in place (all slots of a module are cut together, fused projections included)."""
    removals: dict[int, list[torch.Tensor]] = defaultdict(list)
    targets: dict[int, tuple[nn.Module, str]] = {}

    def remove(slots, units: list[int]) -> None:
        if not units:
            return
        for slot in slots:
            key = id(slot.module) * 2 + (slot.dim == "in")
            targets[key] = (slot.module, slot.dim)
            removals[key].append(slot.indices(units))

    attn = adapter.attention(layer) if (plan.kept_heads is not None or plan.kept_kv_heads is not None) else None
    if attn is not None:
        kept_q = plan.kept_heads if plan.kept_heads is not None else list(range(attn.num_heads))
        kept_kv = plan.kept_kv_heads if plan.kept_kv_heads is not None else list(range(attn.num_kv_heads))
        _check_gqa(kept_q, kept_kv, attn.num_heads, attn.num_kv_heads)
        remove(attn.q_slots, _complement(kept_q, attn.num_heads))
        remove(attn.kv_slots, _complement(kept_kv, attn.num_kv_heads))
    ffn = adapter.ffn(layer) if plan.kept_neurons is not None else None
    if ffn is not None:
        if not plan.kept_neurons:
            raise ValueError("a layer must keep at least one FFN neuron")
        remove(ffn.slots, _complement(plan.kept_neurons, ffn.num_neurons))
    for key, (module, dim) in targets.items():
        size = weight_matrix(module).shape[0 if dim == "out" else 1]
        drop = torch.zeros(size, dtype=torch.bool, device="cpu")
        drop[torch.cat(removals[key])] = True
        slice_module(module, dim, (~drop).nonzero().reshape(-1))
    if attn is not None:
        adapter.set_attention_shape(layer, len(kept_q), len(kept_kv))
    if ffn is not None:
        adapter.set_ffn_shape(layer, len(plan.kept_neurons))
    if plan.kept_experts is not None or plan.kept_expert_neurons is not None:
        spec = adapter.experts(layer)
        if spec is None:
            raise ValueError("the plan removes experts or expert neurons from a layer without experts")
        adapter.set_experts_shape(layer, *prune_experts(spec, plan.kept_experts, plan.kept_expert_neurons))


def _check_gqa(kept_q: Sequence[int], kept_kv: Sequence[int], num_heads: int, num_kv: int) -> None:
    """Kept query heads must read kept KV heads, the same number per KV head, in order."""
    group = num_heads // num_kv
    if not kept_kv or not kept_q:
        raise ValueError("a layer must keep at least one attention head")
    per_kv = defaultdict(int)
    for h in kept_q:
        if h // group not in set(kept_kv):
            raise ValueError(f"query head {h} is kept but its KV head {h // group} is removed")
        per_kv[h // group] += 1
    counts = {per_kv[k] for k in kept_kv}
    if len(counts) != 1:
        raise ValueError(f"every kept KV head must keep the same number of query heads (got {sorted(per_kv.values())})")


def remove_layers(model: nn.Module, adapter: ArchAdapter, removed: Sequence[int]) -> None:
    """Drop whole decoder blocks and renumber the rest (cache slots, per-layer config lists)."""
    if not removed:
        return
    layers = adapter.decoder_layers(model)
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    if not kept:
        raise ValueError("cannot remove every layer")
    new = nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        adapter.set_layer_index(layer, j)
    layers._modules.clear()
    for j, layer in enumerate(new):
        layers.add_module(str(j), layer)
    adapter.set_num_layers(model.config, kept)


def layer_widths(model: nn.Module, adapter: ArchAdapter | None = None) -> list[dict[str, int]]:
    """Current ``{"heads", "kv_heads", "neurons"}`` of every decoder layer (plus ``"experts"`` and
    ``"expert_neurons"`` for families with mixture-of-experts layers)."""
    adapter = adapter or get_adapter(model)
    out = []
    for layer in adapter.decoder_layers(model):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        widths = {
            "heads": attn.num_heads if attn else 0,
            "kv_heads": attn.num_kv_heads if attn else 0,
            "neurons": ffn.num_neurons if ffn else 0,
        }
        if "experts" in adapter.units:
            moe = adapter.experts(layer)
            widths.update(experts=moe.num_experts if moe else 0, expert_neurons=moe.num_neurons if moe else 0)
        out.append(widths)
    return out


def widths_by_kind(model: nn.Module, kinds: tuple[str, ...] = ("heads", "neurons"),
                   adapter: ArchAdapter | None = None) -> dict[str, list[int]]:
    """:func:`layer_widths` turned around: one list over the decoder layers per unit kind, e.g.
    ``{"heads": [9, 7, ...], "neurons": [1536, 1102, ...]}`` (where an allocation put the cut)."""
    widths = layer_widths(model, adapter)
    return {k: [w[k] for w in widths] for k in kinds}


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
