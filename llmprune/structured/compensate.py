"""Bias compensation (FLAP): fold the removed units' average output into the output projection's bias.

Removing a head or neuron drops its contribution ``W[:, cols] @ x[cols]``. Its mean over calibration
tokens, ``W[:, cols] @ E[x[cols]]``, is a constant vector that can be added to the bias of o_proj /
down_proj, so only the fluctuating part is lost. Where the projection has no bias, one is created and the
family's config flag (e.g. Llama's ``attention_bias`` / ``mlp_bias``) is set so the checkpoint reloads;
the other modules under that flag get zero biases.

Example::

    deltas = compensation_deltas(adapter, model, plan, stats)   # before surgery
    enable_biases(adapter, model, deltas)
    apply_plan(model, plan, adapter)
    add_deltas(deltas)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from ..calibration.calibrate import LayerStats
from ..core.config import LayerPlan, PrunePlan
from ..arch.surgery import _complement

__all__ = ["Delta", "compensation_deltas", "layer_deltas", "zero_deltas", "enable_biases", "add_deltas"]


@dataclass
class Delta:
    module: nn.Module
    kind: str  # "attention" or "ffn"
    value: torch.Tensor  # [out_features]


def _removed(kept: Sequence[int] | None, n: int) -> list[int]:
    return [] if kept is None else _complement(kept, n)


@torch.no_grad()
def compensation_deltas(adapter: ArchAdapter, model: nn.Module, plan: PrunePlan,
                        stats: Sequence[LayerStats]) -> list[Delta]:
    """Mean contribution of every removed head / neuron, per output projection (computed before surgery)."""
    deltas = []
    for i, (layer, lp) in enumerate(zip(adapter.decoder_layers(model), plan.layers)):
        if i not in plan.removed_layers:
            deltas += layer_deltas(adapter, layer, lp, stats[i])
    return deltas


@torch.no_grad()
def layer_deltas(adapter: ArchAdapter, layer: nn.Module, lp: LayerPlan, stats: LayerStats) -> list[Delta]:
    """:func:`compensation_deltas` of one layer (the streaming path holds one layer at a time)."""
    deltas = []
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    todo = []
    if attn is not None:
        todo.append(("attention", attn.output, _removed(lp.kept_heads, attn.num_heads)))
    if ffn is not None:
        todo.append(("ffn", ffn.output, _removed(lp.kept_neurons, ffn.num_neurons)))
    for kind, slot, units in todo:
        if not units:
            continue
        cols = slot.indices(units)
        mean = stats.inputs[slot.module].mean.index_select(0, cols)
        w = weight_matrix(slot.module).detach().double().index_select(1, cols.to(slot.module.weight.device))
        deltas.append(Delta(slot.module, kind, (w @ mean.to(w.device)).to(slot.module.weight.dtype)))
    return deltas


def zero_deltas(adapter: ArchAdapter, model: nn.Module) -> list[Delta]:
    """A zero delta for every layer's attention and FFN output projection: with :func:`enable_biases`,
    gives each of them a bias for reconstruction to refit (``PruneConfig(reconstruct=True,
    bias_compensation=True)``)."""
    deltas = []
    for layer in adapter.decoder_layers(model):
        for kind, spec in (("attention", adapter.attention(layer)), ("ffn", adapter.ffn(layer))):
            if spec is not None and isinstance(spec.output.module, nn.Module):
                out = weight_matrix(spec.output.module).shape[0]
                deltas.append(Delta(spec.output.module, kind, torch.zeros(out)))
    return deltas


def _zero_bias(module: nn.Module) -> None:
    if getattr(module, "bias", None) is None:
        out = weight_matrix(module).shape[0]
        module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))


def enable_biases(adapter: ArchAdapter, model: nn.Module, deltas: Sequence[Delta]) -> None:
    """Make sure every compensated module has a bias that the saved config declares.

    Raises ``ValueError`` (before changing anything) when a module has no bias and the family's config
    cannot declare one.
    """
    flags = adapter.bias_flags(model.config)
    needed = {d.kind for d in deltas if getattr(d.module, "bias", None) is None}
    missing = sorted(k for k in needed if k not in flags)
    if missing:
        raise ValueError(
            f"bias compensation needs a bias on the {' and '.join(missing)} output projection, which "
            f"{model.config.model_type} checkpoints cannot declare; prune without bias compensation"
        )
    for kind in sorted(needed):
        flag, names = flags[kind]
        setattr(model.config, flag, True)
        for layer in adapter.decoder_layers(model):
            for name in names:
                _zero_bias(layer.get_submodule(name))


@torch.no_grad()
def add_deltas(deltas: Sequence[Delta]) -> None:
    for d in deltas:
        d.module.bias.add_(d.value.to(d.module.bias.device))
