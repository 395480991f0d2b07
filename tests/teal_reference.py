# Slow reference for the tests and scripts/bench_calib_speed.py: llmprune/sparsity/activation.py as of b41ca56,
# verbatim but for absolute imports. Do not optimise or fix it: the fast code is checked against it.
"""Dynamic activation sparsity (TEAL-style, Liu et al., 2024): zero the small-magnitude entries of each
linear layer's input, with one magnitude threshold per layer calibrated for a target sparsity.

For a target linear layer with input ``x`` and target sparsity ``s``, the threshold ``t`` is the
``s``-quantile of ``|x|`` over calibration tokens, so that a fraction ``s`` of the entries satisfies
``|x| <= t`` and is zeroed. The quantile is computed from a uniform random sample of at most
``max_samples`` values per layer (reservoir sampling with random priorities), so memory stays bounded
whatever the amount of calibration text. It is the midpoint of the two order statistics around the
quantile, so ``|x| <= t`` and ``|x| < t`` zero the same entries of the sample.

Calibration runs one decoder layer at a time. With ``sequential=True`` (default) every threshold is
calibrated on the inputs the layer sees at inference time, i.e. with all earlier thresholds applied
(earlier layers, and earlier projections of the same layer: q/k/v, then o_proj, then gate/up, then
down_proj for Llama).

The thresholds are ``{full module name: float}`` (``model.layers.0.mlp.down_proj``), the format of
``llmprune.runtime.KernelConfig(thresholds=...)`` whose ``ActSparseLinear`` keeps ``|x| > t``.
:func:`apply_activation_sparsity` is the plain-PyTorch reference (forward pre-hooks).

Example::

    th = calibrate_activation_thresholds(model, tok, "calib.txt", sparsity=0.4)
    with apply_activation_sparsity(model, th, track=True) as h:
        model(ids)
    h.achieved()    # {name: fraction of zeroed inputs}
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from llmprune.arch import get_adapter
from llmprune.calibration.calibrate import CalibrationError, capture_layer_inputs, run_layer
from llmprune.core.progress import progress_bar
from llmprune.calibration.calibrate import as_batches
from llmprune.sparsity._common import DEFAULT_TARGETS, layer_targets

__all__ = [
    "calibrate_activation_thresholds",
    "apply_activation_sparsity",
    "measure_activation_sparsity",
    "ActivationSparsityHandle",
    "threshold_from_sample",
    "read_activation_thresholds",
    "Reservoir",
]


class Reservoir:
    """Uniform random sample (without replacement) of at most ``capacity`` values of a stream."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.values = torch.empty(0)
        self.keys = torch.empty(0)
        self.seen = 0

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).float().cpu()
        self.seen += v.numel()
        keys = torch.rand(v.numel(), generator=self.gen)
        if self.values.numel() + v.numel() <= self.capacity:
            self.values = torch.cat([self.values, v])
            self.keys = torch.cat([self.keys, keys])
            return
        if v.numel() > self.capacity:  # pre-select within the chunk to keep the concat small
            keys, idx = torch.topk(keys, self.capacity, largest=False)
            v = v[idx]
        allk = torch.cat([self.keys, keys])
        allv = torch.cat([self.values, v])
        self.keys, idx = torch.topk(allk, self.capacity, largest=False)
        self.values = allv[idx]


def threshold_from_sample(abs_values: torch.Tensor, sparsity: float) -> float:
    """Threshold ``t`` such that a fraction ``sparsity`` of ``abs_values`` is ``<= t`` (and ``< t``)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    a = abs_values.reshape(-1).float()
    n = a.numel()
    if n == 0:
        raise CalibrationError("no activation values to calibrate on")
    k = int(round(sparsity * n))
    if k <= 0:
        return 0.0
    a = torch.sort(a).values
    if k >= n:
        return float(a[-1])
    return float((a[k - 1] + a[k]) / 2)


def _sparsity_for(sparsity: float | Mapping[str, float], full: str, rel: str) -> float:
    if isinstance(sparsity, Mapping):
        for key in (full, rel):
            if key in sparsity:
                return float(sparsity[key])
        for pat, v in sparsity.items():
            if fnmatch.fnmatchcase(full, pat) or fnmatch.fnmatchcase(rel, pat):
                return float(v)
        return 0.0
    return float(sparsity)


def _check_sparsity(sparsity: Any) -> None:
    vals = sparsity.values() if isinstance(sparsity, Mapping) else [sparsity]
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"activation sparsity {v!r} must be a fraction in [0, 1)")


def _sparsify_input(t: float):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x.masked_fill(x.abs() <= t, 0),) + tuple(args[1:])

    return hook


@torch.no_grad()
def calibrate_activation_thresholds(
    model: nn.Module,
    tokenizer: Any = None,
    calibration: Any = None,
    sparsity: float | Mapping[str, float] = 0.5,
    targets: Sequence[str] = DEFAULT_TARGETS,
    n_samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    max_samples: int = 1 << 18,
    sequential: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Per-layer magnitude thresholds hitting ``sparsity`` on the calibration data.

    Args:
        tokenizer: needed when ``calibration`` is text or a text file.
        calibration: text file path, text, ``[n, seq_len]`` token ids or a list of token-id batches.
        sparsity: one target for every layer, or ``{name or fnmatch pattern: target}`` (unmatched: 0).
        targets: fnmatch patterns of linear layers inside decoder blocks (full or in-block names).
        max_samples: per-layer sample size for the quantile (bounds memory).
        sequential: calibrate each layer on inputs with all earlier thresholds applied.
    Returns:
        ``{full module name: threshold}`` for every target linear layer (0.0 where the target is 0).
    """
    _check_sparsity(sparsity)
    batches = as_batches(calibration, tokenizer, n_samples, seq_len, seed, batch_size)
    if batches is None:
        raise CalibrationError("activation-sparsity calibration needs calibration data: pass calibration=<text "
                               "file, text or token-id batches> (and tokenizer= for text)")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    targets_per_layer = layer_targets(model, layers, list(targets))
    if not any(targets_per_layer):
        raise ValueError(f"targets={list(targets)} match no linear layer inside the decoder blocks")
    names = {id(m): n for n, m in model.named_modules()}
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    captured = capture_layer_inputs(model, adapter, batches)
    hidden = captured.hidden
    result: dict[str, float] = {}

    def run(layer: nn.Module, i: int) -> list[torch.Tensor]:
        return [run_layer(layer, h, *captured.layer_args[i][b], device) for b, h in enumerate(hidden)]

    for i in progress_bar(range(len(layers)), desc="calibrating activation thresholds", disable=not progress):
        layer = layers[i].to(device)
        prefix = names.get(id(layer), "")
        group = [(full, mod, _sparsity_for(sparsity, full, full[len(prefix) + 1:] if prefix else full))
                 for full, mod in targets_per_layer[i]]
        done: dict[str, float] = {}
        dense_outs = None
        pending = [g for g in group if g[2] > 0]
        for full, _, s in group:
            if s <= 0:
                done[full] = 0.0
        while pending:
            reservoirs = {full: Reservoir(max_samples, seed=seed + 7919 * len(result) + j)
                          for j, (full, _, _) in enumerate(pending)}
            first_inputs: dict[str, torch.Tensor] = {}
            order: list[str] = []
            handles = []
            for full, mod, _ in group:
                if full in done and done[full] > 0:
                    handles.append(mod.register_forward_pre_hook(_sparsify_input(done[full])))
            for full, mod, _ in pending:
                def rec(m, args, full=full):
                    x = args[0]
                    if full not in first_inputs:
                        first_inputs[full] = x
                        order.append(full)
                    reservoirs[full].update(x.abs())
                handles.append(mod.register_forward_pre_hook(rec))
            try:
                outs = run(layer, i)
            finally:
                for h in handles:
                    h.remove()
            if dense_outs is None:
                dense_outs = outs
            missing = [full for full, _, _ in pending if reservoirs[full].seen == 0]
            if missing:
                raise CalibrationError(f"no calibration inputs reached {missing[0]}")
            if sequential:
                head = first_inputs[order[0]]
                stage = [f for f in order
                         if first_inputs[f] is head or (first_inputs[f].shape == head.shape
                                                        and torch.equal(first_inputs[f], head))]
            else:
                stage = list(order)
            targets_s = {full: s for full, _, s in pending}
            for full in stage:
                done[full] = threshold_from_sample(reservoirs[full].values, targets_s[full])
            pending = [g for g in pending if g[0] not in done]
            del reservoirs, first_inputs
        result.update({full: done[full] for full, _, _ in group})
        if sequential and any(done.get(full, 0) > 0 for full, _, _ in group):
            handles = [mod.register_forward_pre_hook(_sparsify_input(done[full]))
                       for full, mod, _ in group if done[full] > 0]
            try:
                outs = run(layer, i)
            finally:
                for h in handles:
                    h.remove()
        elif dense_outs is not None:
            outs = dense_outs
        else:
            outs = run(layer, i)
        hidden = [o.to(home) if device != home else o for o in outs]
        if device != home:
            layers[i].to(home)
    return result


@dataclass
class ActivationSparsityHandle:
    """Installed activation-sparsity hooks; ``remove()`` (or leaving the ``with`` block) uninstalls them."""

    handles: list[Any] = field(default_factory=list)
    zeros: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def achieved(self) -> dict[str, float]:
        """Fraction of zero inputs seen by each hooked layer since installation (needs ``track=True``)."""
        return {n: self.zeros[n] / self.totals[n] for n in self.totals if self.totals[n]}

    def overall(self) -> float:
        """Fraction of zero inputs over all hooked layers (each layer weighted by its input size)."""
        total = sum(self.totals.values())
        return sum(self.zeros.values()) / total if total else 0.0

    def __enter__(self) -> "ActivationSparsityHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_activation_sparsity(model: nn.Module, thresholds: Mapping[str, float],
                              track: bool = False) -> ActivationSparsityHandle:
    """Install forward pre-hooks zeroing each named layer's inputs with ``|x| <= threshold``.

    Reference implementation (plain PyTorch, any device). ``track=True`` counts zeroed inputs per layer.
    """
    mods = dict(model.named_modules())
    unknown = [n for n in thresholds if n not in mods]
    if unknown:
        raise KeyError(f"thresholds name unknown module(s): {unknown[:3]}")
    handle = ActivationSparsityHandle()
    for name, t in thresholds.items():
        t = float(t)
        if not t >= 0:
            raise ValueError(f"threshold for {name!r} must be >= 0, got {t}")

        def hook(module, args, t=t, name=name):
            x = args[0]
            y = x.masked_fill(x.abs() <= t, 0) if t > 0 else x
            if track:
                handle.zeros[name] = handle.zeros.get(name, 0) + int((y == 0).sum())
                handle.totals[name] = handle.totals.get(name, 0) + y.numel()
            return (y,) + tuple(args[1:])

        handle.handles.append(mods[name].register_forward_pre_hook(hook))
    return handle


@torch.no_grad()
def measure_activation_sparsity(model: nn.Module, thresholds: Mapping[str, float], batches: Any,
                                tokenizer: Any = None, n_samples: int = 32, seq_len: int = 256,
                                seed: int = 1, batch_size: int = 8) -> dict[str, float]:
    """Achieved fraction of zeroed inputs per layer when running ``batches`` (text, file or token ids)
    with the thresholds applied; key ``"__overall__"`` holds the size-weighted mean."""
    data = as_batches(batches, tokenizer, n_samples, seq_len, seed, batch_size)
    if data is None:
        raise CalibrationError("measure_activation_sparsity needs data")
    dev = next(model.parameters()).device
    with apply_activation_sparsity(model, thresholds, track=True) as h:
        for b in data:
            model(b.to(dev), use_cache=False)
    out = h.achieved()
    out["__overall__"] = h.overall()
    return out


def read_activation_thresholds(folder: str | os.PathLike) -> dict[str, float]:
    """TEAL thresholds saved by ``llmprune sparsify --activation-sparsity`` (in the folder's recipe).

    Example::

        model = AutoModelForCausalLM.from_pretrained(folder)
        apply_activation_sparsity(model, read_activation_thresholds(folder))
    """
    from llmprune.checkpoint.io import read_recipe

    entry = read_recipe(folder).get("activation_sparsity")
    if not isinstance(entry, dict) or not isinstance(entry.get("thresholds"), dict):
        raise ValueError(f"{folder} holds no activation-sparsity thresholds (saved without --activation-sparsity)")
    return {str(k): float(v) for k, v in entry["thresholds"].items()}
