"""Pruning the hidden dimension (embedding channels, Minitron's width axis): scores, selection and surgery.

Removing hidden channel ``c`` removes it from the residual stream everywhere: column ``c`` of the token (and
position) embeddings, entry ``c`` of every norm's weight and bias, input column ``c`` of every projection that
reads the stream (q/k/v, gate/up, the router, batched experts), output row ``c`` of every projection that writes
it (o, down), and column ``c`` of the LM head (tied or not). The adapter lists these axes
(:meth:`~llmprune.arch.base.ArchAdapter.hidden_sites`); this module cuts them all with one index set.

The pruned model is *not* the original with channels masked: an RMSNorm over ``d'`` channels divides by the
RMS of those ``d'`` channels. With the channels' energy mostly kept, the new RMS is about ``sqrt(d/d')`` times
the old one, so every normalised output shrinks by that factor. Two criteria, each registered once here as a
``hidden`` criterion (:func:`~llmprune.structured.criteria.units.register_unit_criterion`; ``PruneConfig.hidden_method``
names one), both needing calibration, neither streamed:

- ``minitron``: mean ``|y|`` of each channel after every norm, summed over norms (Minitron, Muralidharan et
  al. 2024); the norms' weights stay as they were.
- ``rms``: greedy removal of the channels whose loss changes the normalised outputs least, with each norm's
  output scaled by the closed-form least-squares factor for its new RMS (:func:`rms_greedy`), and those
  factors folded into the norms' weights (Gemma: into ``1 + w``).

Gemma scales embeddings by ``sqrt(hidden_size)``, rebuilt from the config on reload: the embedding weights
absorb ``sqrt(d / d')`` (and, tied, the final norm ``sqrt(d' / d)``) so the function is unchanged.

Example::

    kept, scales = choose_hidden(model, adapter, PruneConfig(hidden=0.25), batches)
    prune_hidden(model, adapter, kept, scales)          # model.config.hidden_size == len(kept)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import HiddenSite, _is_conv1d
from ..calibration.calibrate import CalibrationError
from ..calibration.norms import NormStats, norm_statistics
from ..core.config import PruneConfig
from ..core.config import RatioError
from .criteria.units import get_unit_criterion, register_unit_criterion
from .select import keep_after_removing

__all__ = ["hidden_to_remove", "hidden_norms", "minitron_scores", "rms_greedy", "choose_hidden", "prune_hidden",
           "scale_norm", "RMS_SAMPLE_TOKENS", "RMS_GREEDY_STEPS"]

#: tokens whose per-token RMS the ``rms`` criterion follows (spread over the calibration batches)
RMS_SAMPLE_TOKENS = 512
#: greedy rounds of the ``rms`` criterion (each removes 1/RMS_GREEDY_STEPS of the channels to remove)
RMS_GREEDY_STEPS = 32


def hidden_to_remove(ratio: float, hidden: int) -> int:
    """Channels removed for ``ratio`` of ``hidden`` (nearest whole channel, at least one kept)."""
    n = round(ratio * hidden)
    if n >= hidden:
        raise RatioError(f"--hidden {ratio:g} would remove every hidden channel ({n} of {hidden})")
    return n


def hidden_norms(adapter: ArchAdapter, model: nn.Module) -> list[nn.Module]:
    """Every norm over the hidden channels, in forward order."""
    return [s.module for s in adapter.hidden_sites(model) if s.kind == "norm"]


# ---- criteria (pure functions of the statistics) -------------------------------------------------------------
def minitron_scores(stats: Sequence[NormStats]) -> torch.Tensor:
    """Minitron's channel importance: mean ``|LN(x)_c|`` over tokens, summed over every norm."""
    return sum(s.abs_sum / max(1, s.count) for s in stats)  # type: ignore[return-value]


def rms_greedy(x2: Sequence[torch.Tensor], y2: Sequence[torch.Tensor], eps: Sequence[float], n_remove: int,
               steps: int = RMS_GREEDY_STEPS) -> tuple[list[int], list[float]]:
    """Channels to keep, and each norm's output scale, minimising the normalised outputs' error.

    For norm ``n`` and sampled token ``t`` (``x²``/``y²`` its squared inputs/outputs, ``[tokens, hidden]``), after
    removing set ``R`` (kept ``K``, ``|K| = k``) the kept outputs become ``y_c · r_t`` with
    ``r_t = sqrt((Σ_all x²/d + eps) / (Σ_K x²/k + eps))``, the removed ones 0. With the output scaled by
    ``α_n``, the squared error is ``Σ_t Σ_R y² + Σ_t A_t (α r_t - 1)²`` (``A_t = Σ_K y²``); the best
    ``α_n = Σ r A / Σ r² A`` leaves ``E_n - (Σ r A)² / Σ r² A`` (``E_n`` the norm's total energy). Each round
    removes the ``ceil(n_remove / steps)`` channels whose single removal leaves the smallest error summed over
    norms (each relative to ``E_n``). Returns ``(kept ascending, α per norm)``.
    """
    d = x2[0].shape[1]
    removed = torch.zeros(d, dtype=torch.bool)
    chunk = max(1, math.ceil(n_remove / max(1, steps)))
    x2 = [x.double() for x in x2]
    y2 = [y.double() for y in y2]
    base = [x.sum(1) / d + e for x, e in zip(x2, eps)]  # [T]: the original mean square + eps
    energy = [y.sum().clamp_min(1e-30) for y in y2]
    while int(removed.sum()) < n_remove:
        keep = (~removed).double()
        m = d - int(removed.sum()) - 1
        cost = torch.zeros(d, dtype=torch.float64)
        for x, y, b, e, en in zip(x2, y2, base, eps, energy):
            qk, ak = x @ keep, y @ keep  # [T]
            r = torch.sqrt(b[:, None] / ((qk[:, None] - x) / m + e))  # [T, d]: candidate c removed
            a = ak[:, None] - y
            num, den = (r * a).sum(0), (r * r * a).sum(0).clamp_min(1e-30)
            cost += 1 - (num * num / den) / en
        cost[removed] = float("inf")
        take = min(chunk, n_remove - int(removed.sum()))
        removed[torch.topk(cost, take, largest=False).indices] = True  # topk ties: lower index first
    keep = (~removed).double()
    k = int(keep.sum())
    alphas = []
    for x, y, b, e in zip(x2, y2, base, eps):
        r = torch.sqrt(b / ((x @ keep) / k + e))
        a = y @ keep
        alphas.append(float((r * a).sum() / (r * r * a).sum().clamp_min(1e-30)))
    return (~removed).nonzero().reshape(-1).tolist(), alphas


def _minitron(stats: Sequence[NormStats], n_remove: int) -> tuple[list[int], None]:
    return keep_after_removing(minitron_scores(stats), n_remove), None


def _rms(stats: Sequence[NormStats], n_remove: int) -> tuple[list[int], list[float]]:
    samples = [s.samples() for s in stats]
    return rms_greedy([x for x, _ in samples], [y for _, y in samples], [s.eps for s in stats], n_remove)


register_unit_criterion("hidden", "minitron", "mean |activation| after every norm, summed over norms (Minitron)",
                        _minitron, calibration="required", needs=("norm_outputs",), streams=False)
register_unit_criterion("hidden", "rms", "greedy on the normalised outputs' error, each norm's weight corrected in "
                        "closed form for its new RMS", _rms, calibration="required",
                        needs=("norm_outputs", "norm_samples"), streams=False)


def choose_hidden(model: nn.Module, adapter: ArchAdapter, config: PruneConfig, batches: Sequence[torch.Tensor] | None,
                  progress: bool = True) -> tuple[list[int], dict[str, float] | None]:
    """Kept hidden channels for ``config.hidden`` by the registered criterion ``config.hidden_method``, and (a
    criterion that rescales the norms, ``rms``) each norm's output scale by module name."""
    criterion = get_unit_criterion("hidden", config.hidden_method)
    if batches is None and criterion.needs_calibration:
        raise CalibrationError("pruning the hidden dimension scores channels on activations: pass calibration="
                               "<text file> (CLI: --calib FILE)")
    d = int(model.config.hidden_size)
    n_remove = hidden_to_remove(config.hidden, d)
    norms = hidden_norms(adapter, model)
    sample_tokens = RMS_SAMPLE_TOKENS if "norm_samples" in criterion.needs else 0
    stats = norm_statistics(model, norms, batches, sample_tokens=sample_tokens, seed=config.seed, progress=progress)
    kept, alphas = criterion.fn(stats, n_remove)
    if alphas is None:
        return kept, None
    names = {id(m): n for n, m in model.named_modules()}
    return kept, {names[id(norm)]: a for norm, a in zip(norms, alphas)}


# ---- surgery ---------------------------------------------------------------------------------------------------
def scale_norm(norm: nn.Module, factor: float, offset: float = 0.0) -> None:
    """Multiply a norm's output by ``factor`` through its weights (scale ``offset + w``; bias scaled too)."""
    with torch.no_grad():
        norm.weight.copy_((norm.weight.double() + offset).mul(factor).sub(offset).to(norm.weight.dtype))
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.mul_(factor)


def _cut(module: Any, name: str, axis: int, keep: torch.Tensor, done: dict[int, tuple[Any, nn.Parameter]]) -> None:
    """Keep ``keep`` along ``axis`` of ``module.<name>``; a parameter shared by several modules (tied LM head)
    is cut once and the same new parameter given to each."""
    old = getattr(module, name)
    if old is None:
        return
    if id(old) not in done:
        data = old.data.index_select(axis, keep.to(old.device)).contiguous()
        done[id(old)] = (old, nn.Parameter(data, requires_grad=old.requires_grad))  # old kept alive: ids stay unique
    setattr(module, name, done[id(old)][1])


def _cut_site(site: HiddenSite, keep: torch.Tensor, done: dict) -> None:
    m, k = site.module, len(keep)
    if site.kind == "embedding":
        _cut(m, "weight", 1, keep, done)
        m.embedding_dim = k
    elif site.kind == "norm":
        _cut(m, "weight", 0, keep, done)
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            _cut(m, "bias", 0, keep, done)
        if hasattr(m, "normalized_shape"):
            m.normalized_shape = (k,)
    elif site.kind == "param":
        _cut(m, site.name, site.axis, keep, done)
    else:  # projections: Linear weight [out, in], Conv1D weight [in, out]
        conv = _is_conv1d(m)
        if site.kind == "in":
            _cut(m, "weight", 0 if conv else 1, keep, done)
            if hasattr(m, "in_features"):
                m.in_features = k
        else:
            _cut(m, "weight", 1 if conv else 0, keep, done)
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                _cut(m, "bias", 0, keep, done)
            if conv:
                m.nf = k
            elif hasattr(m, "out_features"):
                m.out_features = k


def _sync_attributes(model: nn.Module, old: int, new: int) -> None:
    # Modules cache the width (Qwen3-MoE's router reshapes with self.hidden_dim); plain ints only.
    for module in model.modules():
        for attr in ("hidden_size", "hidden_dim"):
            if type(vars(module).get(attr)) is int and vars(module)[attr] == old:
                setattr(module, attr, new)


def prune_hidden(model: nn.Module, adapter: ArchAdapter, kept: Sequence[int],
                 norm_scales: dict[str, float] | None = None) -> None:
    """Keep hidden channels ``kept`` (original indices) everywhere, in place; ``config.hidden_size`` follows and
    ``head_dim`` is made explicit. ``norm_scales`` (module name -> factor) multiplies those norms' outputs."""
    if adapter.hidden_refusal:
        raise RatioError(f"{adapter.family}: the hidden size cannot be pruned: {adapter.hidden_refusal}")
    d = int(model.config.hidden_size)
    keep = torch.as_tensor(sorted(set(int(i) for i in kept)), dtype=torch.long)
    if len(keep) != len(kept) or not len(keep) or int(keep[0]) < 0 or int(keep[-1]) >= d:
        raise ValueError(f"kept hidden channels must be distinct indices in [0, {d}); got {len(kept)} entries")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    offset = adapter.norm_weight_offset(model.config)
    sites = adapter.hidden_sites(model)
    done: dict[int, tuple[Any, nn.Parameter]] = {}
    with torch.no_grad():
        for site in sites:
            _cut_site(site, keep, done)
        for name, factor in (norm_scales or {}).items():
            scale_norm(model.get_submodule(name), factor, offset)
        factor = adapter.rescale_embeddings(model, len(keep))
        if factor != 1.0:  # the smaller sqrt(hidden_size) scale: embeddings absorb the difference
            emb.weight.mul_(factor)
            if tied:  # ... and so would the logits: the final norm takes it back
                for norm in adapter.final_norms(model):
                    scale_norm(norm, 1.0 / factor, offset)
    _sync_attributes(model, d, len(keep))
    adapter.set_hidden_size(model.config, len(keep))
