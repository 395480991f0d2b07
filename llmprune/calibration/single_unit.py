"""Single-unit performance (the seed: Tzach, Kanter et al., Phys. Rev. E 111, 065307 (2025)), adapted to LLM
heads, KV groups and FFN neurons.

In the original a CNN filter's importance is what it achieves *alone*: with every other filter's readout
silenced, its contributions are averaged per true label into a matrix ``M[true, output]``, normalised by its
maximum and thresholded at 0.3; labels whose diagonal survives are grouped into clusters (label sets whose
pairwise entries all survive) and the rest of the surviving entries is noise. Filters without a cluster
contribute nothing.

For an LLM (no class labels) we use next-token prediction on the calibration text (our adaptation):

- labels are the ``top_k`` most frequent target tokens of the calibration windows;
- a unit's solo contribution to the residual stream is its slice of the output projection (o_proj columns of
  a head, the down_proj column of a neuron) times its input; it is read out through the frozen final norm
  (its gain ``γ`` and the mean RMS of the final hidden state: the norm's scale at a typical position) and the
  LM head rows of the ``top_k`` labels;
- ``M_u[y, k]`` is the mean over positions whose target is label ``y`` of the readout logit of label ``k``.
  It is linear in the unit's input, so one pass gathers, per input feature of every output projection, its sum
  over the positions of each label (``[in, top_k]``); every unit's matrix then follows by one batched product.

:func:`cluster_analysis` is the normalise / threshold / cluster / noise step, a pure function of ``M``;
units are ranked by cluster signal × SNR / (1 + SNR), and units with no cluster score 0 (removed first).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from .calibrate import InputStats, LayerStats

__all__ = ["THRESHOLD", "DEFAULT_TOP_K", "cluster_analysis", "unit_scores", "single_unit_statistics"]

#: the seed's threshold on the max-normalised matrix
THRESHOLD = 0.3
DEFAULT_TOP_K = 64


@torch.no_grad()
def cluster_analysis(M: torch.Tensor, threshold: float = THRESHOLD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(signal, snr, n_clustered)`` for a batch of unit matrices ``M`` ``[n, K, K]`` (rows: true label).

    Each matrix is divided by its maximum entry and entries ``>= threshold`` survive. Labels whose diagonal
    survives are grouped greedily (strongest diagonal first) into clusters whose pairwise entries all survive,
    both ways. ``signal`` is the sum of the normalised entries inside clusters, ``noise`` the sum of the other
    surviving entries, ``snr = signal / noise`` (``inf`` without noise); a unit with no cluster has signal 0.
    """
    M = M.double()
    n, K, _ = M.shape
    peak = M.flatten(1).max(1).values.clamp_min(1e-30).reshape(n, 1, 1)
    Mn = torch.where(peak > 1e-30, M / peak, torch.zeros_like(M))
    alive = Mn >= threshold
    both = alive & alive.transpose(1, 2)
    signal = torch.zeros(n, dtype=torch.float64)
    noise = torch.zeros(n, dtype=torch.float64)
    clustered = torch.zeros(n, dtype=torch.long)
    diag = torch.diagonal(Mn, dim1=1, dim2=2)
    for u in range(n):
        candidates = [int(y) for y in torch.argsort(diag[u], descending=True) if bool(alive[u, y, y])]
        in_cluster = torch.zeros(K, K, dtype=torch.bool)
        used: set[int] = set()
        for y in candidates:
            if y in used:
                continue
            members = [y]
            for z in candidates:
                if z not in used and z not in members and all(bool(both[u, z, m]) for m in members):
                    members.append(z)
            used.update(members)
            idx = torch.tensor(members)
            in_cluster[idx.reshape(-1, 1), idx.reshape(1, -1)] = True
        clustered[u] = len(used)
        signal[u] = Mn[u][in_cluster].sum()
        noise[u] = Mn[u][alive[u] & ~in_cluster].sum()
    snr = torch.where(noise > 0, signal / noise.clamp_min(1e-30), torch.full_like(signal, float("inf")))
    return signal, snr, clustered


def unit_scores(M: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Importance of each unit from its matrix: cluster signal × SNR / (1 + SNR); 0 without a cluster."""
    signal, snr, _ = cluster_analysis(M, threshold)
    weight = torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (1 + snr))
    return (signal * weight).float()


@torch.no_grad()
def single_unit_statistics(model: nn.Module, adapter: ArchAdapter, batches: Iterable[torch.Tensor],
                           output_modules: dict[int, list[nn.Module]], stats: list[LayerStats] | None = None,
                           top_k: int = DEFAULT_TOP_K) -> list[LayerStats]:
    """Gather per-label input sums of every output projection in ``output_modules`` (layer -> modules) and
    their readouts; stored on each module's :class:`InputStats` as ``label_sums`` ``[in, K]``,
    ``label_counts`` ``[K]`` and ``readout`` ``[K, in]`` (the label logits per unit input)."""
    batches = list(batches)
    layers = adapter.decoder_layers(model)
    stats = stats if stats is not None else [LayerStats() for _ in layers]
    device = next(model.parameters()).device
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    labels = torch.bincount(targets).argsort(descending=True)[:top_k]
    K = labels.numel()
    label_of = torch.full((int(targets.max()) + 1,), -1, dtype=torch.long)
    label_of[labels] = torch.arange(K)
    sums: dict[nn.Module, torch.Tensor] = {}
    handles, current = [], {}
    for i, modules in output_modules.items():
        for module in modules:
            sums[module] = torch.zeros(weight_matrix(module).shape[1], K, dtype=torch.float64)

            def hook(m, args, m_=module):
                x = args[0].detach()[:, :-1].reshape(-1, args[0].shape[-1]).double().cpu()  # positions with a target
                lab = current["labels"]
                keep = lab >= 0
                sums[m_].index_add_(1, lab[keep], x[keep].t())

            handles.append(module.register_forward_pre_hook(hook))
    norm = _final_norm(model)
    rms: list[torch.Tensor] = []
    if norm is not None:
        handles.append(norm.register_forward_pre_hook(
            lambda m, a: rms.append(a[0].detach().double().pow(2).mean(-1).sqrt().reshape(-1).cpu())))
    counts = torch.zeros(K, dtype=torch.float64)
    try:
        for ids in batches:
            lab = label_of[ids[:, 1:].reshape(-1).clamp_max(label_of.numel() - 1)]
            lab[ids[:, 1:].reshape(-1) >= label_of.numel()] = -1
            current["labels"] = lab
            counts += torch.bincount(lab[lab >= 0], minlength=K).double()
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    head = model.get_output_embeddings().weight.detach().double().cpu()[labels]  # [K, hidden]
    gain = getattr(norm, "weight", None)
    scale = (gain.detach().double().cpu() if gain is not None else torch.ones(head.shape[1], dtype=torch.float64))
    if getattr(model.config, "model_type", "").startswith(("gemma", "llmprune_gemma")):
        scale = 1 + scale  # Gemma's norms multiply by (1 + w)
    mean_rms = torch.cat(rms).mean() if rms else torch.tensor(1.0, dtype=torch.float64)
    readout_base = head * scale.reshape(1, -1) / mean_rms  # [K, hidden]
    for i, modules in output_modules.items():
        for module in modules:
            s = stats[i].inputs.setdefault(module, InputStats())
            s.label_sums, s.label_counts = sums[module], counts
            s.readout = readout_base @ weight_matrix(module).detach().double().cpu()  # [K, in]
    return stats


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    decoder = getattr(base, "decoder", None)
    if decoder is not None:
        return _final_norm_of(decoder)
    return None


def _final_norm_of(module: nn.Module) -> nn.Module | None:
    for name in ("final_layer_norm", "norm"):
        m = getattr(module, name, None)
        if isinstance(m, nn.Module):
            return m
    return None
