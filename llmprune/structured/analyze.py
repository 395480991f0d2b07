"""The seed's per-layer view of single-unit performance: per decoder layer, the share of attention heads and FFN
neurons that the single-unit test finds non-essential, and what removing exactly those costs.

**Non-essential** means: the unit's solo label matrix (:mod:`llmprune.calibration.single_unit`: its write alone,
read out through the frozen final norm and LM head, averaged per true next token over the ``top_k`` most frequent
ones) has **no label cluster** at the seed's threshold (entries >= ``threshold`` of the matrix's maximum). This
is the seed's own test (Tzach, Kanter et al. 2025: "filters with no cluster contribute nothing"), it needs no
threshold of our own beyond the seed's, and these are exactly the units the ``single-unit`` criterion scores 0
under ``clusters`` and ``snr``, i.e. removes first.

The cost is measured, not estimated: the mean next-token NLL on the calibration windows with exactly those
units of ONE layer removed (their inputs to o_proj / down_proj zeroed, which is what removing them does; every
other layer dense), against the dense model's. Three such losses per layer: its non-essential heads, its
non-essential neurons, both. A set that is empty costs nothing and is not run.

Memory: the statistics are ``in × top_k`` floats per output projection; the unit matrices (``units × top_k²``)
exist for one layer at a time.

Example::

    batches = calibration_batches(tok, text, n_samples=32, seq_len=256)
    report = analyze_single_unit(model, batches)
    print(format_report(report))
    save_plot(report, "analysis.png")     # False (and nothing written) without matplotlib
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.base import Slot
from ..calibration.single_unit import DEFAULT_TOP_K, THRESHOLD, cluster_analysis, single_unit_statistics
from ..core.progress import progress_bar
from .budget import calibration_loss
from .criteria.single_unit import unit_matrices

__all__ = ["LayerAnalysis", "SingleUnitAnalysis", "analyze_single_unit", "non_essential_units", "masked_units",
           "format_report", "save_plot"]

#: logits of at most this many (position, vocabulary) entries per loss forward
_LOGIT_BUDGET = 1 << 26


@dataclass
class LayerAnalysis:
    """One decoder layer: its units, the non-essential ones (indices), and the calibration loss with those
    removed from this layer alone (``None``: the layer has no such unit kind; equal to the dense loss when the set
    is empty)."""

    layer: int
    heads: int = 0
    neurons: int = 0
    removable_heads: list[int] = field(default_factory=list)
    removable_neurons: list[int] = field(default_factory=list)
    loss_heads: float | None = None
    loss_neurons: float | None = None
    loss_both: float | None = None

    @property
    def heads_fraction(self) -> float:
        return len(self.removable_heads) / self.heads if self.heads else 0.0

    @property
    def neurons_fraction(self) -> float:
        return len(self.removable_neurons) / self.neurons if self.neurons else 0.0


@dataclass
class SingleUnitAnalysis:
    """:func:`analyze_single_unit`'s result: the dense loss, the protocol and one :class:`LayerAnalysis` per layer."""

    dense_loss: float
    windows: int
    seq_len: int
    top_k: int
    threshold: float
    layers: list[LayerAnalysis] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per layer the counts, fractions, removed indices, losses and their change vs dense."""
        layers = []
        for a in self.layers:
            row = asdict(a)
            row["heads_fraction"], row["neurons_fraction"] = a.heads_fraction, a.neurons_fraction
            for kind in ("heads", "neurons", "both"):
                loss = row[f"loss_{kind}"]
                row[f"delta_{kind}"] = None if loss is None else loss - self.dense_loss
            layers.append(row)
        return {"dense_loss": self.dense_loss, "windows": self.windows, "seq_len": self.seq_len,
                "top_k": self.top_k, "threshold": self.threshold,
                "definition": "non-essential: the unit's solo label matrix has no cluster at the threshold; "
                              "losses: mean next-token NLL on the calibration windows with those units of one "
                              "layer removed, the rest dense",
                "layers": layers}


def _output_slot(slots: Sequence[Slot]) -> Slot | None:
    return next((s for s in slots if s.dim == "in"), None)


def non_essential_units(slot: Slot, n_units: int, stats: Any, threshold: float = THRESHOLD) -> list[int]:
    """The units (indices) of the output projection ``slot`` whose solo label matrix has no cluster."""
    _, _, clustered = cluster_analysis(unit_matrices(slot, n_units, stats), threshold)
    return [int(u) for u in torch.nonzero(clustered == 0).flatten()]


@contextmanager
def masked_units(masks: Sequence[tuple[Slot, list[int]]]) -> Iterator[None]:
    """While inside, the inputs of the given units to their output projection are zeroed (the units removed)."""
    handles = []
    for slot, units in masks:
        if not units:
            continue
        cols = slot.indices(torch.tensor(units, dtype=torch.long))

        def zero(module: nn.Module, args: tuple, cols: torch.Tensor = cols) -> tuple:
            x = args[0].clone()
            x[..., cols.to(x.device)] = 0
            return (x, *args[1:])

        handles.append(slot.module.register_forward_pre_hook(zero))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def analyze_single_unit(model: nn.Module, batches: Sequence[torch.Tensor], top_k: int = DEFAULT_TOP_K,
                        threshold: float = THRESHOLD, progress: bool = False) -> SingleUnitAnalysis:
    """Per decoder layer: the non-essential heads and FFN neurons and the calibration loss with them removed
    from that layer alone (see the module docstring). ``batches``: ``[n, seq_len]`` token-id tensors."""
    adapter = get_adapter(model)
    was_training = model.training
    model.eval()
    layers = adapter.decoder_layers(model)
    kinds: list[dict[str, tuple[Slot, int]]] = []
    outputs: dict[int, list[nn.Module]] = {}
    for i, layer in enumerate(layers):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        found = {}
        if attn is not None and (slot := _output_slot(attn.q_slots)) is not None:
            found["heads"] = (slot, attn.num_heads)
        if ffn is not None and (slot := _output_slot(ffn.slots)) is not None:
            found["neurons"] = (slot, ffn.num_neurons)
        kinds.append(found)
        outputs[i] = list(dict.fromkeys(s.module for s, _ in found.values()))
    stats = single_unit_statistics(model, adapter, batches, outputs, top_k=top_k)
    windows = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])
    vocab = model.get_output_embeddings().weight.shape[0]
    per = max(1, _LOGIT_BUDGET // (windows.shape[1] * vocab))
    loss_batches = list(windows.split(per))
    dense = calibration_loss(model, loss_batches)
    report = SingleUnitAnalysis(dense, windows.shape[0], windows.shape[1], top_k, threshold)
    for i in progress_bar(range(len(layers)), desc="layers", disable=not progress):
        a = LayerAnalysis(i)
        removable = {}
        for kind, (slot, n) in kinds[i].items():
            setattr(a, kind, n)
            removable[kind] = non_essential_units(slot, n, stats[i].inputs[slot.module], threshold)
            setattr(a, f"removable_{kind}", removable[kind])
        stats[i] = None  # this layer's statistics are no longer needed

        def loss(which: tuple[str, ...]) -> float | None:
            if not any(k in kinds[i] for k in which):
                return None
            masks = [(kinds[i][k][0], removable[k]) for k in which if k in kinds[i]]
            if not any(units for _, units in masks):
                return dense
            with masked_units(masks):
                return calibration_loss(model, loss_batches)

        a.loss_heads, a.loss_neurons = loss(("heads",)), loss(("neurons",))
        if a.removable_heads and a.removable_neurons:
            a.loss_both = loss(("heads", "neurons"))
        elif a.removable_neurons or a.removable_heads:  # one set is empty: removing both is removing the other
            a.loss_both = a.loss_neurons if a.removable_neurons else a.loss_heads
        else:
            a.loss_both = dense if kinds[i] else None
        report.layers.append(a)
    model.train(was_training)
    return report


def format_report(report: SingleUnitAnalysis) -> str:
    """A plain-text table, one row per layer (no token text)."""
    def pct(count: int, total: int) -> str:
        return f"{count / total:6.1%} ({count}/{total})" if total else "–"

    def delta(loss: float | None) -> str:
        return f"{loss - report.dense_loss:+.4f}" if loss is not None else "–"

    head = (f"non-essential = no label cluster (top-{report.top_k} next tokens, threshold {report.threshold:g}); "
            f"loss = mean next-token NLL on {report.windows} x {report.seq_len} calibration tokens, "
            f"dense {report.dense_loss:.4f}; each layer's units removed alone")
    cols = ("layer", "heads non-essential", "d loss", "FFN neurons non-essential", "d loss", "d loss both")
    rows = [(str(a.layer), pct(len(a.removable_heads), a.heads), delta(a.loss_heads),
             pct(len(a.removable_neurons), a.neurons), delta(a.loss_neurons), delta(a.loss_both))
            for a in report.layers]
    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def save_plot(report: SingleUnitAnalysis, path: str | Path, title: str = "") -> bool:
    """Write the per-layer plot (layers on x; the non-essential fraction of heads and of FFN neurons, and the loss
    change of removing them) to ``path``. Returns False, writing nothing, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [a.layer for a in report.layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(xs, [a.heads_fraction for a in report.layers], "o-", label="attention heads")
    top.plot(xs, [a.neurons_fraction for a in report.layers], "s-", label="FFN neurons")
    top.set_ylabel("non-essential fraction")
    top.set_ylim(0, 1)
    top.legend()
    top.set_title(title or "single-unit performance: units with no label cluster, per layer")
    for kind, marker, label in (("heads", "o-", "heads removed"), ("neurons", "s-", "neurons removed"),
                                ("both", "^--", "both")):
        values = [getattr(a, f"loss_{kind}") for a in report.layers]
        top_xs = [x for x, v in zip(xs, values) if v is not None]
        bottom.plot(top_xs, [v - report.dense_loss for v in values if v is not None], marker, label=label)
    bottom.axhline(0, color="grey", linewidth=0.8)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("loss change (nats)")
    bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True
