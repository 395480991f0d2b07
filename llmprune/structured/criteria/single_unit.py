"""Single-unit performance criterion (the seed's method, adapted to LLMs; see :mod:`llmprune.calibration.single_unit`).

A head's, KV group's or FFN neuron's importance is what it predicts *on its own*: its solo contribution read out
through the frozen final norm and LM head over the top-K calibration target tokens, analysed into label
clusters and noise. Units with no cluster score 0 and go first.

Example::

    scores = single_unit(ffn.slots, ffn.num_neurons, layer_stats.inputs)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...arch.base import Slot
from ...calibration.calibrate import InputStats
from .base import register_criterion

__all__ = ["single_unit"]


def _prepare(model: nn.Module, adapter, batches, progress: bool):
    from ...calibration.single_unit import single_unit_statistics

    outputs = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):  # the output projections units write through
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        mods = [s.module for s in (attn.q_slots if attn is not None else []) if s.dim == "in"]
        mods += [s.module for s in (ffn.slots if ffn is not None else []) if s.dim == "in"]
        outputs[i] = list(dict.fromkeys(mods))
    return single_unit_statistics(model, adapter, batches, outputs)


@register_criterion("single-unit", needs_calibration=True, prepare=_prepare,
                    description="what the unit predicts alone through the final norm and LM head: label clusters "
                                "and SNR (the seed's single-filter performance)")
def single_unit(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None) -> torch.Tensor:
    from ...calibration.single_unit import unit_scores

    if stats is None:
        raise ValueError("the single-unit criterion needs calibration data (give calibration text)")
    slot = next((s for s in slots if s.dim == "in" and s.module in stats and stats[s.module].readout is not None),
                None)
    if slot is None and all(s.dim == "out" for s in slots):
        # key/value heads own no output columns: a KV group's solo performance is its query heads' (summed
        # with these zeros when groups are ranked)
        return torch.zeros(n_units)
    if slot is None:
        raise ValueError("single-unit: no readout statistics for this unit's output projection "
                         "(mixture-of-experts neurons are not supported; use wanda or flap there)")
    s = stats[slot.module]
    idx = slot.indices(torch.arange(n_units)).reshape(n_units, slot.width)
    means = s.label_sums / s.label_counts.clamp_min(1).reshape(1, -1)  # [in, K] mean input per true label
    S = means[idx]  # [n, w, K]
    R = s.readout[:, idx].permute(1, 0, 2)  # [n, K, w]
    M = torch.einsum("nwy,nkw->nyk", S, R)  # [n, true label, output label]
    return unit_scores(M)
