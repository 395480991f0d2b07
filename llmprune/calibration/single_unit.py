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
  (its gain ``γ`` and the RMS of the final hidden state) and the LM head rows of the ``top_k`` labels;
- ``M_u[y, k]`` is the mean over positions whose target is label ``y`` of the readout logit of label ``k``
  (the norm's scale taken as the mean RMS over positions). It is linear in the unit's input, so one pass
  gathers, per input feature of every output projection, its sum over the positions of each label
  (``[in, top_k]``); every unit's matrix then follows by one batched product.

How a unit is scored (:data:`SCORES`, ``PruneConfig.single_unit_score``):

- ``clusters``: :func:`unit_scores`, cluster signal × SNR / (1 + SNR) of ``M_u`` (units with no cluster 0);
- ``snr``: :func:`snr_scores`, the seed's signal-to-noise ratio: surviving entries inside clusters over those
  outside, counted on the thresholded matrix (units with no cluster 0);
- ``solo-loss``: :func:`solo_loss_gain`, what the unit's write alone does to the next-token loss: at every
  position whose target is a label, the cross-entropy over the ``top_k`` labels of the unit's solo logits
  (through the final norm at that position's own RMS and the LM head), subtracted from that of an empty
  stream (``log top_k``), averaged. Unlike the matrix scores it keeps how strongly a unit writes;
- ``solo-loss-refit``: the same for the part of the unit's input that the least-squares refit of the layer's
  other units (the refit ``reconstruct`` and ``obs`` make) cannot replace, :func:`refit_residual`: a unit the
  others can stand in for scores near 0.

:func:`cluster_analysis` is the normalise / threshold / cluster / noise step, a pure function of ``M``.

Example::

    stats = single_unit_statistics(model, adapter, batches, {0: [layer.mlp.down_proj]})
    s = stats[0].inputs[layer.mlp.down_proj]     # label_sums [in, K], label_counts [K], readout [K, in]
"""

from __future__ import annotations

import math
from typing import Iterable, get_args

import numpy as np
import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from ..core.config import SingleUnitScore
from .calibrate import InputStats, LayerStats

__all__ = ["THRESHOLD", "DEFAULT_TOP_K", "SCORES", "SNR_NOISE_FLOOR", "cluster_analysis", "unit_scores",
           "snr_scores", "solo_loss_gain", "refit_residual", "single_unit_statistics"]

#: the seed's threshold on the max-normalised matrix
THRESHOLD = 0.3
DEFAULT_TOP_K = 64
#: the formulations of the single-unit score (module docstring; ``PruneConfig.single_unit_score``)
SCORES: tuple[str, ...] = get_args(SingleUnitScore)
#: ``snr``: the noise of a unit whose surviving entries all lie in clusters (half an entry, below any real noise)
SNR_NOISE_FLOOR = 0.5
#: solo-loss logits computed per chunk of units: at most this many (unit, position, label) entries at once
_CHUNK = 1 << 23


def _clusters(M: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Mn, alive, in_cluster)`` of unit matrices ``M`` ``[n, K, K]``: the max-normalised matrices, the entries
    that survive the threshold, and the entries inside a cluster (labels grouped greedily, strongest diagonal
    first, into sets whose pairwise entries all survive both ways)."""
    M = M.double()
    n, K, _ = M.shape
    peak = M.flatten(1).max(1).values.clamp_min(1e-30).reshape(n, 1, 1)
    Mn = torch.where(peak > 1e-30, M / peak, torch.zeros_like(M))
    alive = Mn >= threshold
    live = alive.numpy()
    both = live & live.transpose(0, 2, 1)
    order = torch.argsort(torch.diagonal(Mn, dim1=1, dim2=2), dim=1, descending=True, stable=True).numpy()
    in_cluster = np.zeros((n, K, K), dtype=bool)
    for u in range(n):
        candidates = [int(y) for y in order[u] if live[u, y, y]]
        used: set[int] = set()
        for y in candidates:
            if y in used:
                continue
            members = [y]
            for z in candidates:
                if z not in used and z not in members and both[u, z, members].all():
                    members.append(z)
            used.update(members)
            in_cluster[u][np.ix_(members, members)] = True
    return Mn, alive, torch.from_numpy(in_cluster)


@torch.no_grad()
def cluster_analysis(M: torch.Tensor, threshold: float = THRESHOLD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(signal, snr, n_clustered)`` for a batch of unit matrices ``M`` ``[n, K, K]`` (rows: true label).

    Each matrix is divided by its maximum entry and entries ``>= threshold`` survive. Labels whose diagonal
    survives are grouped greedily (strongest diagonal first) into clusters whose pairwise entries all survive,
    both ways. ``signal`` is the sum of the normalised entries inside clusters, ``noise`` the sum of the other
    surviving entries, ``snr = signal / noise`` (``inf`` without noise); a unit with no cluster has signal 0.
    """
    Mn, alive, in_cluster = _clusters(M, threshold)
    signal = (Mn * in_cluster).sum((1, 2))
    noise = (Mn * (alive & ~in_cluster)).sum((1, 2))
    clustered = torch.diagonal(in_cluster, dim1=1, dim2=2).sum(1).long()
    snr = torch.where(noise > 0, signal / noise.clamp_min(1e-30), torch.full_like(signal, float("inf")))
    return signal, snr, clustered


def unit_scores(M: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Importance of each unit from its matrix: cluster signal × SNR / (1 + SNR); 0 without a cluster."""
    signal, snr, _ = cluster_analysis(M, threshold)
    weight = torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (1 + snr))
    return (signal * weight).float()


@torch.no_grad()
def snr_scores(M: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """The seed's signal-to-noise ratio of each unit's matrix (``single_unit_score="snr"``): the surviving entries
    inside its clusters (``Σ |cluster|²``) over the surviving entries outside them, both counted on the thresholded
    matrix as the authors' code does; a unit without noise has :data:`SNR_NOISE_FLOOR`, one without a cluster
    scores 0.

    Example::

        snr_scores(M)        # M: [n, K, K] -> [n]
    """
    _, alive, in_cluster = _clusters(M, threshold)
    signal = in_cluster.sum((1, 2)).double()
    noise = (alive & ~in_cluster).sum((1, 2)).double()
    return torch.where(signal > 0, signal / noise.clamp_min(SNR_NOISE_FLOOR), torch.zeros_like(signal)).float()


@torch.no_grad()
def solo_loss_gain(x: torch.Tensor, labels: torch.Tensor, readout: torch.Tensor, units: torch.Tensor,
                   inv_rms: torch.Tensor) -> torch.Tensor:
    """Per unit, the next-token loss its write alone removes, summed over positions
    (``single_unit_score="solo-loss"``).

    Args:
        x: the output projection's inputs ``[T, in]`` at positions whose target is a label.
        labels: each position's target label ``[T]`` (``0..K-1``).
        readout: label logits per unit input of the unnormalised stream ``[K, in]`` (LM head rows × the final
            norm's gain, times the projection's weight).
        units: each unit's input features ``[n, w]``.
        inv_rms: ``1 / RMS`` of the final norm's input at each position ``[T]``.

    Returns ``[n]`` (float64): ``Σ_t log K − CE(z_u(t), label_t)`` with the unit's solo logits
    ``z_u(t) = inv_rms_t · readout[:, u] x_u(t)``: positive when the unit alone moves probability to the true
    labels, 0 for a silent unit, negative when it points away from them. Computed in float32 as
    ``z_y − log1p(mean_k expm1(z_k))``, which keeps full relative precision for the small logits of one unit
    (a chunk with a logit beyond ±30 goes through ``logsumexp`` instead).

    Example::

        gain = solo_loss_gain(x, labels, readout, torch.arange(in_features).reshape(-1, 1), inv_rms)
    """
    x, readout, inv_rms = x.float(), readout.float(), inv_rms.float()
    T, K, n = x.shape[0], readout.shape[0], units.shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    if T == 0:
        return out
    per = max(1, _CHUNK // (T * K))
    for start in range(0, n, per):
        idx = units[start : start + per]
        z = torch.einsum("tcw,kcw->ctk", x[:, idx], readout[:, idx]) * inv_rms.reshape(1, -1, 1)
        true = z.gather(2, labels.reshape(1, -1, 1).expand(idx.shape[0], T, 1)).squeeze(2)
        if float(z.abs().max()) <= 30:
            log_mean_exp = torch.log1p(torch.expm1(z).mean(2))
        else:
            log_mean_exp = torch.logsumexp(z.double(), 2) - math.log(K)
        out[start : start + per] = (true.double() - log_mean_exp.double()).sum(1)
    return out


@torch.no_grad()
def refit_residual(x: torch.Tensor, inverse_gram: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Each unit's input less what the other input features can stand in for (``single_unit_score=
    "solo-loss-refit"``).

    When unit ``U`` is removed and the projection's other columns are refitted by damped least squares (as
    ``reconstruct`` / ``obs`` do), the layer output loses ``W_U r_U(t)`` with the ridge residual
    ``r_U = x_U − H_UK (H_KK + λI)⁻¹ x_K`` (``K``: every other feature). With ``P = (H + λI)⁻¹`` this is
    ``r_U = (P_UU)⁻¹ (P x)_U``, computed here for every unit at once.

    Args:
        x: inputs ``[T, in]``; inverse_gram: ``P`` ``[in, in]``; units: disjoint feature sets ``[n, w]``.

    Returns ``[T, in]`` (float64): ``r_U`` in the columns of each unit (columns of no unit are 0).

    Example::

        r = refit_residual(x, torch.linalg.inv(x.T @ x + lam * torch.eye(d)), units)
    """
    P = inverse_gram.double()
    z = x.double() @ P
    block = torch.linalg.inv(P[units.unsqueeze(2), units.unsqueeze(1)])  # [n, w, w]: (P_UU)⁻¹
    out = torch.zeros_like(z)
    out[:, units.reshape(-1)] = torch.einsum("tnw,nvw->tnv", z[:, units], block).reshape(z.shape[0], -1)
    return out


@torch.no_grad()
def single_unit_statistics(model: nn.Module, adapter: ArchAdapter, batches: Iterable[torch.Tensor],
                           output_modules: dict[int, list[nn.Module]], stats: list[LayerStats] | None = None,
                           top_k: int = DEFAULT_TOP_K, units: dict[nn.Module, torch.Tensor] | None = None,
                           score: str = SCORES[0], percdamp: float = 0.01) -> list[LayerStats]:
    """Gather per-label input sums of every output projection in ``output_modules`` (layer -> modules) and
    their readouts; stored on each module's :class:`InputStats` as ``label_sums`` ``[in, K]``,
    ``label_counts`` ``[K]`` and ``readout`` ``[K, in]`` (the label logits per unit input).

    With ``score`` ``solo-loss`` or ``solo-loss-refit`` a second pass adds ``solo_gain`` ``[n]``, the mean
    :func:`solo_loss_gain` per labelled position of each unit of ``units`` (module -> ``[n, w]`` input features);
    ``solo-loss-refit`` first gathers each projection's input Gram matrix (damped by ``percdamp`` × its mean
    diagonal): ``in²`` floats per projection, for every layer at once."""
    if score not in SCORES:
        raise ValueError(f"single_unit_score={score!r}; choose one of {', '.join(SCORES)}")
    batches = list(batches)
    layers = adapter.decoder_layers(model)
    stats = stats if stats is not None else [LayerStats() for _ in layers]
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    labels = torch.bincount(targets).argsort(descending=True)[:top_k]
    K = labels.numel()
    label_of = torch.full((int(targets.max()) + 1,), -1, dtype=torch.long)
    label_of[labels] = torch.arange(K)
    refit = score == "solo-loss-refit"
    modules = [m for ms in output_modules.values() for m in ms]
    sums = {m: torch.zeros(weight_matrix(m).shape[1], K, dtype=torch.float64) for m in modules}
    grams = {m: torch.zeros(weight_matrix(m).shape[1], weight_matrix(m).shape[1], dtype=torch.float64)
             for m in modules} if refit else {}
    current: dict[str, torch.Tensor] = {}

    def gather(m: nn.Module, args: tuple) -> None:
        x = args[0].detach()[:, :-1].reshape(-1, args[0].shape[-1]).double().cpu()  # positions with a target
        lab = current["labels"]
        keep = lab >= 0
        sums[m].index_add_(1, lab[keep], x[keep].t())
        if refit:
            grams[m].addmm_(x.t(), x)

    norm = _final_norm(model)
    rms: list[torch.Tensor] = []
    counts = torch.zeros(K, dtype=torch.float64)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)

    def record_rms(m: nn.Module, a: tuple) -> None:  # the norm's scale at each position (its eps included)
        rms.append((a[0].detach().double().pow(2).mean(-1) + eps).sqrt().cpu())  # [batch, seq]

    per_batch = []
    for ids in batches:
        lab = label_of[ids[:, 1:].reshape(-1).clamp_max(label_of.numel() - 1)]
        lab[ids[:, 1:].reshape(-1) >= label_of.numel()] = -1
        per_batch.append(lab)
        counts += torch.bincount(lab[lab >= 0], minlength=K).double()
    _hooked_passes(model, batches, per_batch, current, {m: gather for m in modules}, norm, record_rms)
    head = model.get_output_embeddings().weight.detach().double().cpu()[labels]  # [K, hidden]
    gain = getattr(norm, "weight", None)
    scale = (gain.detach().double().cpu() if gain is not None else torch.ones(head.shape[1], dtype=torch.float64))
    if getattr(model.config, "model_type", "").startswith(("gemma", "llmprune_gemma")):
        scale = 1 + scale  # Gemma's norms multiply by (1 + w)
    mean_rms = torch.cat([r.reshape(-1) for r in rms]).mean() if rms else torch.tensor(1.0, dtype=torch.float64)
    stream_readout = {m: (head * scale.reshape(1, -1)) @ weight_matrix(m).detach().double().cpu() for m in modules}
    for i, ms in output_modules.items():
        for module in ms:
            s = stats[i].inputs.setdefault(module, InputStats())
            s.label_sums, s.label_counts = sums[module], counts
            s.readout = stream_readout[module] / mean_rms  # [K, in]
    if score.startswith("solo-loss"):
        if units is None or any(m not in units for m in modules):
            raise ValueError("single-unit solo-loss scores need each output projection's units")
        inverse = {}
        for m, H in grams.items():
            lam = percdamp * float(H.diagonal().mean()) or percdamp
            inverse[m] = torch.linalg.inv(H + lam * torch.eye(H.shape[0], dtype=H.dtype)).float()
        grams.clear()
        gains = {m: torch.zeros(units[m].shape[0], dtype=torch.float64) for m in modules}
        inv_rms = ([1 / r[:, :-1].reshape(-1).clamp_min(1e-12) for r in rms] if rms else
                   [torch.ones(b[:, 1:].numel(), dtype=torch.float64) for b in batches])

        def solo(m: nn.Module, args: tuple) -> None:
            x = args[0].detach()[:, :-1].reshape(-1, args[0].shape[-1]).double().cpu()
            lab, keep = current["labels"], current["labels"] >= 0
            x = refit_residual(x[keep], inverse[m], units[m]) if refit else x[keep]
            gains[m] += solo_loss_gain(x, lab[keep], stream_readout[m], units[m], current["inv_rms"][keep])

        _hooked_passes(model, batches, per_batch, current, {m: solo for m in modules}, None, None, inv_rms)
        labelled = max(float(counts.sum()), 1.0)
        for i, ms in output_modules.items():
            for module in ms:
                stats[i].inputs[module].solo_gain = gains[module] / labelled
    return stats


def _hooked_passes(model: nn.Module, batches: list[torch.Tensor], labels: list[torch.Tensor],
                   current: dict[str, torch.Tensor], hooks: dict, norm: nn.Module | None, on_norm,
                   inv_rms: list[torch.Tensor] | None = None) -> None:
    """One forward pass over ``batches`` with ``hooks`` (module -> ``fn(module, args)``) as forward pre-hooks;
    ``current`` holds the batch's labels (and ``inv_rms``) while it runs."""
    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks.items()]
    if norm is not None and on_norm is not None:
        handles.append(norm.register_forward_pre_hook(on_norm))
    try:
        for b, ids in enumerate(batches):
            current["labels"] = labels[b]
            if inv_rms is not None:
                current["inv_rms"] = inv_rms[b]
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


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
