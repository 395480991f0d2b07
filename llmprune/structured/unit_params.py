"""Parameters one structured unit owns: an attention unit (a KV group, or one query head of every group) or
an FFN neuron, counted over all its rows, columns and bias entries (the allocations' budgets)."""

from __future__ import annotations

import torch

from ..arch.base import AttentionSpec, FFNSpec, Slot, weight_matrix

__all__ = ["slot_params", "attention_unit_params", "neuron_params"]


def slot_params(slot: Slot) -> int:
    """Parameters one unit owns through ``slot`` (its rows or columns, and its bias entries)."""
    out_f, in_f = weight_matrix(slot.module).shape
    if slot.dim == "out":
        bias = getattr(slot.module, "bias", None)
        return slot.width * (in_f + (1 if isinstance(bias, torch.Tensor) else 0))
    return slot.width * out_f


def attention_unit_params(attn: AttentionSpec, mode: str) -> tuple[int, int]:
    """(parameters, query heads) of one attention unit in ``mode``."""
    per_q = sum(slot_params(s) for s in attn.q_slots)
    per_kv = sum(slot_params(s) for s in attn.kv_slots)
    if mode == "group" or attn.group_size == 1:
        return attn.group_size * per_q + per_kv, attn.group_size
    return attn.num_kv_heads * per_q, attn.num_kv_heads


def neuron_params(ffn: FFNSpec) -> int:
    return sum(slot_params(s) for s in ffn.slots)
