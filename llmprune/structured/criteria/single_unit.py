"""Single-unit performance criterion (the seed's method, adapted to LLMs; see :mod:`llmprune.calibration.single_unit`).

A head's, KV group's or FFN neuron's importance is what it predicts *on its own*: its solo contribution read out
through the frozen final norm and LM head over the top-K calibration target tokens. ``single_unit_score`` picks
how that is scored: ``clusters`` (default) and ``snr`` analyse the unit's label matrix into clusters and noise
(units with no cluster score 0 and go first); ``solo-loss`` and ``solo-loss-refit`` take the next-token loss its
write alone removes (the latter after the layer's other units are refitted to replace it).

Example::

    scores = single_unit(ffn.slots, ffn.num_neurons, layer_stats.inputs, single_unit_score="snr")
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...arch.base import Slot
from ...calibration.calibrate import InputStats
from ...calibration.single_unit import SCORES
from .base import register_criterion

__all__ = ["single_unit", "unit_matrices"]


def _units(slot: Slot, n: int) -> torch.Tensor:
    return slot.indices(torch.arange(n)).reshape(n, slot.width)


def _prepare(model: nn.Module, adapter, batches, progress: bool, single_unit_score: str, percdamp: float):
    from ...calibration.single_unit import single_unit_statistics

    outputs, units = {}, {}
    for i, layer in enumerate(adapter.decoder_layers(model)):  # the output projections units write through
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        for spec, n in ((attn.q_slots, attn.num_heads) if attn is not None else ([], 0),
                        (ffn.slots, ffn.num_neurons) if ffn is not None else ([], 0)):
            for slot in (s for s in spec if s.dim == "in"):
                units.setdefault(slot.module, _units(slot, n))
        mods = [s.module for s in (attn.q_slots if attn is not None else []) if s.dim == "in"]
        mods += [s.module for s in (ffn.slots if ffn is not None else []) if s.dim == "in"]
        outputs[i] = list(dict.fromkeys(mods))
    return single_unit_statistics(model, adapter, batches, outputs, units=units, score=single_unit_score,
                                  percdamp=percdamp)


def unit_matrices(slot: Slot, n_units: int, s: InputStats) -> torch.Tensor:
    """Every unit's solo label matrix ``M[unit, true label, output label]`` from the statistics of the output
    projection ``slot`` reads (its ``label_sums``, ``label_counts`` and ``readout``)."""
    idx = _units(slot, n_units)
    means = s.label_sums / s.label_counts.clamp_min(1).reshape(1, -1)  # [in, K] mean input per true label
    S = means[idx]  # [n, w, K]
    R = s.readout[:, idx].permute(1, 0, 2)  # [n, K, w]
    return torch.einsum("nwy,nkw->nyk", S, R)


@register_criterion("single-unit", needs_calibration=True, prepare=_prepare,
                    options=("single_unit_score", "percdamp"),
                    description="what the unit predicts alone through the final norm and LM head (the seed's "
                                "single-filter performance), scored by --single-unit-score")
def single_unit(slots: list[Slot], n_units: int, stats: Mapping[nn.Module, InputStats] | None,
                single_unit_score: str = SCORES[0], percdamp: float | None = None) -> torch.Tensor:
    """Scores of ``n_units`` units (higher = more important) by ``single_unit_score``; ``percdamp`` is read by
    the statistics pass only (``solo-loss-refit``'s damping)."""
    from ...calibration.single_unit import snr_scores, unit_scores

    if single_unit_score not in SCORES:
        raise ValueError(f"single_unit_score={single_unit_score!r}; choose one of {', '.join(SCORES)}")
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
    if single_unit_score.startswith("solo-loss"):
        if s.solo_gain is None or s.solo_gain.numel() != n_units:
            raise ValueError(f"single-unit: no {single_unit_score} statistics for these {n_units} units")
        return s.solo_gain.float()
    M = unit_matrices(slot, n_units, s)
    return snr_scores(M) if single_unit_score == "snr" else unit_scores(M)
