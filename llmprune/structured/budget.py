"""``params``: a target fraction of *all* parameters split among the hidden, head and FFN axes (Minitron).

Candidates: the hidden axis takes a share ``s`` in :data:`HIDDEN_SHARES` of the target (``hidden = s * params``;
every weight matrix and the embeddings have a hidden side, so ``hidden`` removes about that fraction of all
parameters), and heads and FFN neurons remove the rest at about the same ratio ``b``. Heads come in whole
attention units, so the heads ratio is rounded to the nearest achievable one and the FFN ratio solved exactly
for the budget. A split that would need a ratio outside ``[0, 0.95]`` is skipped.

Each candidate is *measured*: a copy of the model is pruned with a fast proxy (the run's hidden criterion,
``wanda`` with uniform widths for heads and neurons, no refit) on three quarters of the calibration windows
and its mean token loss is taken on the last quarter. The split with the lowest loss is then pruned with
the run's own method. Cost: one proxy prune and one loss pass per candidate (4 candidates), about
``4 x (2 calibration passes + 1 loss pass)`` forwards over the calibration windows, on top of the real prune.

Example::

    cfg, report = choose_split(model, adapter, PruneConfig(params=0.25), batches, llmprune.prune)
    cfg.hidden, cfg.heads, cfg.ffn        # the measured best split; report["candidates"] lists them all
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..core.config import PruneConfig
from ..core.progress import progress_bar
from .hidden import hidden_to_remove
from ..core.config import RatioError
from .select import units_to_remove
from ..arch.surgery import count_parameters

__all__ = ["HIDDEN_SHARES", "PROXY_METHOD", "MAX_BLOCK_RATIO", "parameter_groups", "split_for", "calibration_loss",
           "choose_split"]

#: share of the parameter target given to the hidden axis, one candidate each
HIDDEN_SHARES = (0.0, 1 / 3, 2 / 3, 1.0)
#: how candidates are pruned before their loss is measured (fast, no refit)
PROXY_METHOD = "wanda"
#: the largest heads / FFN ratio a candidate may ask for
MAX_BLOCK_RATIO = 0.95


def _count(module: Any, names: Sequence[str] = ("weight", "bias")) -> int:
    return sum(t.numel() for t in (getattr(module, n, None) for n in names) if isinstance(t, torch.Tensor))


def parameter_groups(model: nn.Module, adapter: ArchAdapter) -> dict[str, int]:
    """``total`` distinct parameters; those of the attention and FFN projections; and ``per_query`` /
    ``per_kv``: the parameters one query head (its q rows and o columns) and one KV head (k and v rows) own,
    summed over layers (``query`` units remove only the former, ``group`` units both)."""
    attention = ffn = per_query = per_kv = 0
    d = int(model.config.hidden_size)
    for layer in adapter.decoder_layers(model):
        attn, mlp, moe = adapter.attention(layer), adapter.ffn(layer), adapter.experts(layer)
        if attn is not None:
            attention += sum(_count(m) for m in {id(s.module): s.module for s in attn.q_slots + attn.kv_slots}.values())
            per_query += 2 * d * attn.head_dim  # weights only: biases are a rounding error here
            per_kv += 2 * d * attn.head_dim
        if mlp is not None:
            ffn += sum(_count(m) for m in {id(s.module): s.module for s in mlp.slots}.values())
        if moe is not None:
            ffn += sum(getattr(p.module, p.name).numel() for p in moe.params)
    return {"total": count_parameters(model), "attention": attention, "ffn": ffn, "per_query": per_query,
            "per_kv": per_kv}


def _heads_removed(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, ratio: float, rounding: str,
                   groups: dict[str, int]) -> tuple[float, float]:
    """``(heads fraction, attention fraction)`` a uniform ``ratio`` removes in whole attention units (first
    attention layer's geometry); ``(-1, -1)`` when it cannot be realised."""
    from .select import resolve_config

    attn = next((a for a in map(adapter.attention, adapter.decoder_layers(model)) if a is not None), None)
    if ratio <= 0 or attn is None:
        return 0.0, 0.0
    unit_mode = resolve_config(model, adapter, dataclasses.replace(cfg, heads=ratio, params=0.0)).attention_unit
    unit = attn.group_size if unit_mode == "group" or attn.group_size == 1 else attn.num_kv_heads
    try:
        n = units_to_remove(ratio, attn.num_heads, unit, rounding)
    except RatioError:
        return -1.0, -1.0
    a = n * unit / attn.num_heads
    removed = a * groups["per_query"] * attn.num_heads
    if unit_mode == "group" or attn.group_size == 1:
        removed += a * groups["per_kv"] * attn.num_kv_heads
    return a, removed / max(1, groups["attention"])


def split_for(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, share: float,
              groups: dict[str, int] | None = None) -> PruneConfig | None:
    """The config removing ``cfg.params`` of all parameters with ``share`` of it on the hidden axis (``None``
    when no heads / FFN ratio in range meets the budget)."""
    groups = groups or parameter_groups(model, adapter)
    total, attention, ffn = groups["total"], groups["attention"], groups["ffn"]
    d = int(model.config.hidden_size)
    hidden = 0.0
    if share > 0:
        try:
            hidden = hidden_to_remove(share * cfg.params, d) / d
        except RatioError:
            return None
        if hidden == 0:
            return None
    # After: (1 - hidden) * (rest + attention - removed_attention + (1 - f) * ffn) = (1 - params) * total
    need = (1 - cfg.params) * total / (1 - hidden)
    rest = total - attention - ffn
    b = 1 - (need - rest) / max(1, attention + ffn)
    if b < -0.02 or b > MAX_BLOCK_RATIO:
        return None
    if b <= 0:
        return dataclasses.replace(cfg, params=0.0, hidden=round(hidden, 6), heads=0.0, ffn=0.0)
    for rounding in ("nearest", "down"):
        a, attn_frac = _heads_removed(model, adapter, cfg, b, rounding, groups) if attention else (0.0, 0.0)
        if a < 0:
            continue
        f = 1 - (need - rest - (1 - attn_frac) * attention) / max(1, ffn) if ffn else 0.0
        if 0.0 <= f <= MAX_BLOCK_RATIO:
            f = round(f, 4) if f * min(_ffn_widths(model, adapter) or [1]) >= 0.5 else 0.0  # < half a neuron: none
            return dataclasses.replace(cfg, params=0.0, hidden=round(hidden, 6), heads=round(a, 6), ffn=f)
    return None


def _ffn_widths(model: nn.Module, adapter: ArchAdapter) -> list[int]:
    out = []
    for layer in adapter.decoder_layers(model):
        mlp, moe = adapter.ffn(layer), adapter.experts(layer)
        out += [x.num_neurons for x in (mlp, moe) if x is not None]
    return out


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token loss over ``batches`` (every window's tokens weighted equally)."""
    device = next(model.parameters()).device
    total = count = 0.0
    for batch in batches:
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return total / max(1.0, count)


def choose_split(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, batches: Sequence[torch.Tensor],
                 prune: Callable[..., Any], device: Any = None, progress: bool = True) -> tuple[PruneConfig, dict[str, Any]]:
    """Measure every candidate split of ``cfg.params`` and return the best one's config (the run's method and
    options, ``params`` 0) with a report: ``{"target", "candidates": [...], "chosen"}``. ``prune`` is
    :func:`llmprune.prune` (passed in: the pipeline calls this module)."""
    groups = parameter_groups(model, adapter)
    shares = HIDDEN_SHARES if not adapter.hidden_refusal else (0.0,)
    held = max(1, len(batches) // 4) if len(batches) > 1 else 0
    calib, evaluation = (list(batches[:-held]), list(batches[-held:])) if held else (list(batches), list(batches))
    candidates: list[dict[str, Any]] = []
    for share in progress_bar(shares, desc="params split", disable=not progress):
        split = split_for(model, adapter, cfg, share, groups)
        if split is None:
            continue
        trial = copy.deepcopy(model)
        proxy = dataclasses.replace(split, method=PROXY_METHOD, allocation="uniform", reconstruct=False,
                                    bias_compensation=False)
        prune(trial, proxy, calibration=calib, device=device, progress=False)
        candidates.append({"hidden_share": round(share, 4), "hidden": split.hidden, "heads": split.heads,
                           "ffn": split.ffn, "removed": 1 - count_parameters(trial) / groups["total"],
                           "loss": calibration_loss(trial, evaluation)})
        del trial
    if not candidates:
        raise RatioError(f"--params {cfg.params:g}: no split of hidden channels, heads and FFN neurons reaches it "
                         f"(each ratio at most {MAX_BLOCK_RATIO}); lower --params")
    best = min(range(len(candidates)), key=lambda i: candidates[i]["loss"])
    c = candidates[best]
    chosen = dataclasses.replace(cfg, params=0.0, hidden=c["hidden"], heads=c["heads"], ffn=c["ffn"])
    return chosen, {"target": cfg.params, "candidates": candidates, "chosen": best, "proxy": PROXY_METHOD}
