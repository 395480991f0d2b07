"""Dynamic activation sparsity (TEAL-style, Liu et al., 2024): zero the small-magnitude entries of each
linear layer's input, with one magnitude threshold per layer calibrated for a target sparsity.

For a target linear layer with input ``x`` and target sparsity ``s``, the threshold ``t`` is the ``s``-quantile of
``|x|`` over all calibration tokens, so that a fraction ``s`` of the entries satisfies ``|x| <= t`` and is zeroed.
The quantile is read from a streamed histogram of ``|x|`` (:class:`.thresholds.AbsHistogram`: 1024 log-spaced bins
per octave, taken from the float32 bit pattern), so memory is fixed whatever the amount of calibration text, every
value counts, and the result is deterministic; within the bin holding the quantile values are interpolated linearly,
so ``t`` is within 0.1% of the exact order statistics. Under ``accelerate launch`` the histograms are summed over
processes, so all processes get the same thresholds.

Calibration runs one decoder layer at a time (:func:`llmprune.calibration.engine.layer_by_layer`). With
``sequential=True`` (default) every threshold is calibrated on the inputs the layer sees at inference time, i.e.
with all earlier thresholds applied (earlier layers, and earlier projections of the same layer: q/k/v, then
o_proj, then gate/up, then down_proj for Llama). Every batch's forward through the layer runs once, paused at
each target until all batches have reached it and its threshold is known (:mod:`._staged`); where holding every
batch's paused forward would not fit in memory (``staged``), each stage takes one pass of the layer over the
calibration batches instead, cut short once the stage's projections have seen their input. The last layer's
forwards stop once its last threshold is known.

Registered as the ``teal`` activation-sparsity method (:func:`~llmprune.sparsity.registry.register_activation_method`):
it reads histograms of each target's inputs, sequentially, and streams (:func:`llmprune.streaming.sparsify_streaming`).

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
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..calibration.calibrate import CalibrationError, as_batches
from ..calibration.engine import LayerStep, layer_by_layer, run_layer
from ._common import DEFAULT_TARGETS, layer_targets
from ._staged import paused_bytes, run_staged
from .registry import register_activation_method
from .thresholds import AbsHistogram

__all__ = [
    "calibrate_activation_thresholds",
    "apply_activation_sparsity",
    "measure_activation_sparsity",
    "ActivationSparsityHandle",
    "read_activation_thresholds",
]

#: ``staged=None`` pauses at most this many batches at once (one worker thread each); more run stage passes
_MAX_PAUSED = 256


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
        # hardshrink zeroes |x| <= t in one pass: x.masked_fill(x.abs() <= t, 0) without the temporaries
        return (torch.nn.functional.hardshrink(args[0], t),) + tuple(args[1:])

    return hook


class _StopLayer(Exception):
    """Raised from a hook to cut a layer's forward short once the pass has recorded what it needs."""


@dataclass
class _Pass:
    """What one pass of a layer over the calibration batches recorded."""

    hists: dict[str, AbsHistogram]
    #: targets calibrated by this pass, in call order
    stage: list[str]
    #: the layer's outputs, when the pass kept them
    outs: list[torch.Tensor] | None


def _record_pass(layer_forward: Callable[[int], torch.Tensor], n_batches: int,
                 pending: Sequence[tuple[str, nn.Module]], applied: Sequence[tuple[nn.Module, float]],
                 split_stages: bool, keep_outputs: bool, device: torch.device) -> _Pass:
    """Run a layer over every batch with ``applied`` thresholds, histogramming the inputs of ``pending`` targets.

    ``split_stages``: only the first stage is calibrated: the first pending target to be called and those
    called with the same input on that batch (q/k/v). A pending target with another input depends on this
    stage's thresholds, so the forward stops there; on later batches, as soon as every stage target has had
    its input. Without outputs to keep, a forward also stops once every pending target has had its input.
    """
    hists = {full: AbsHistogram(device=device) for full, _ in pending}
    stage: list[str] = []
    called: set[str] = set()
    state: dict[str, Any] = {"batch": 0, "head": None, "head_batch": -1, "last_input": None, "last_counts": None}

    def record(module: nn.Module, args: tuple, full: str) -> None:
        x = args[0]
        if full not in stage:
            head = state["head"]
            deciding = head is None or state["batch"] == state["head_batch"]
            if not split_stages or head is None:
                state["head"], state["head_batch"] = x, state["batch"]
                stage.append(full)
            elif deciding and (x is head or (x.shape == head.shape and torch.equal(x, head))):
                stage.append(full)
            elif deciding or called.issuperset(stage):
                raise _StopLayer  # the next stage: its input depends on this stage's thresholds
            else:
                return  # the next stage's target called before this stage is complete on this batch
        called.add(full)
        if state["last_input"] is not x:  # q/k/v (and gate/up) share one input tensor: bin it once
            state["last_input"], state["last_counts"] = x, hists[full].bin_counts(x)
        hists[full].add(state["last_counts"], x.numel())
        if not keep_outputs and len(called) == len(hists):
            raise _StopLayer  # nothing left to record in this forward
        if split_stages and state["batch"] != state["head_batch"] and called.issuperset(stage):
            raise _StopLayer  # the stage is known and complete on this batch

    handles = [mod.register_forward_pre_hook(_sparsify_input(t)) for mod, t in applied]
    handles += [mod.register_forward_pre_hook(lambda m, a, full=full: record(m, a, full)) for full, mod in pending]
    outs: list[torch.Tensor] | None = [] if keep_outputs else None
    try:
        for b in range(n_batches):
            state["batch"], state["last_input"], state["last_counts"] = b, None, None
            called.clear()
            try:
                out = layer_forward(b)
            except _StopLayer:
                continue
            if outs is not None:
                outs.append(out)
    finally:
        for h in handles:
            h.remove()
    return _Pass(hists, stage, outs)


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
    staged: bool | None = None,
    max_memory: int | None = None,
    layer_io: Any = None,
    on_layer: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Per-layer magnitude thresholds hitting ``sparsity`` on the calibration data.

    Args:
        tokenizer: needed when ``calibration`` is text or a text file.
        calibration: text file path, text, ``[n, seq_len]`` token ids or a list of token-id batches.
        sparsity: one target for every layer, or ``{name or fnmatch pattern: target}`` (unmatched: 0).
        targets: fnmatch patterns of linear layers inside decoder blocks (full or in-block names).
        max_samples: unused; kept for callers of the former sampled quantile (the histogram of every
            value has a fixed size).
        sequential: calibrate each layer on inputs with all earlier thresholds applied.
        staged: with ``sequential``, run each batch through a layer once, paused at every target until its
            threshold is known (holds every batch's paused forward: about :func:`._staged.paused_bytes`),
            instead of one pass per stage. ``None``: staged when that estimate fits in a quarter of
            ``max_memory`` (bytes; default: the available memory of the layer's device). Same thresholds
            either way.
        layer_io: :class:`llmprune.calibration.engine.LayerIO` that loads and frees layers when streaming (its
            ``start`` > 0 resumes at that layer; earlier layers' thresholds are then not returned).
        on_layer: called with ``(i, {name: threshold})`` once layer ``i`` is calibrated, before the
            layer is left (streaming keeps them in its resume state).
    Returns:
        ``{full module name: threshold}`` for every target linear layer (0.0 where the target is 0).
    """
    del max_samples
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
    result: dict[str, float] = {}
    for step in layer_by_layer(model, adapter, batches, device=device, layer_io=layer_io, progress=progress,
                               desc="calibrating activation thresholds"):
        i, layer, dev, hidden = step.index, step.layer, step.device, step.inputs
        prefix = names.get(id(layer), "")
        group = [(full, mod, _sparsity_for(sparsity, full, full[len(prefix) + 1:] if prefix else full))
                 for full, mod in targets_per_layer[i]]
        done = {full: 0.0 for full, _, s in group if s <= 0}
        pending = [g for g in group if g[2] > 0]
        need_outputs = i + 1 < len(layers)  # the last layer's output feeds nothing

        def run_batch(b: int, step: LayerStep = step) -> torch.Tensor:
            return run_layer(step.layer, step.inputs[b], *step.args[b], step.device)

        outs = None
        if pending and sequential and _use_staged(staged, layer, hidden, dev, max_memory):
            outs, unreached = _calibrate_staged(run_batch, len(hidden), pending, done, dev, need_outputs)
            if unreached:
                raise CalibrationError(f"no calibration inputs reached {unreached[0]}")
            pending = []
        while pending:
            applied = [(mod, done[full]) for full, mod, _ in group if done.get(full, 0.0) > 0]
            rec = _record_pass(run_batch, len(hidden), [(full, mod) for full, mod, _ in pending], applied,
                               split_stages=sequential, keep_outputs=need_outputs and not sequential, device=dev)
            missing = [full for full, _, _ in pending if full not in rec.stage]
            if missing and (not sequential or not rec.stage):
                raise CalibrationError(f"no calibration inputs reached {missing[0]}")
            targets_s = {full: s for full, _, s in pending}
            for full in rec.stage:
                rec.hists[full].all_reduce()
                done[full] = rec.hists[full].threshold(targets_s[full])
            pending = [g for g in pending if g[0] not in done]
            outs = rec.outs
        result.update({full: done[full] for full, _, _ in group})
        if on_layer is not None:
            on_layer(i, {full: done[full] for full, _, _ in group})
        if need_outputs and outs is None:  # the outputs with this layer's thresholds applied
            applied = [(mod, done[full]) for full, mod, _ in group if done[full] > 0]
            handles = [mod.register_forward_pre_hook(_sparsify_input(t)) for mod, t in applied]
            try:
                outs = step.forward()
            finally:
                for h in handles:
                    h.remove()
        # the last layer's outputs feed nothing: its inputs stand in for them (nothing is computed)
        step.outputs = outs if need_outputs else hidden
    return result


register_activation_method(
    "teal", "TEAL: one |x| threshold per target layer zeroing that fraction of its inputs (Liu et al. 2024)",
    calibrate=calibrate_activation_thresholds, needs="input_histograms", sequential=True, streams=True)


def _use_staged(staged: bool | None, layer: nn.Module, hidden: Sequence[torch.Tensor], device: torch.device,
                max_memory: int | None) -> bool:
    """``staged``, or when ``None`` whether every batch's paused forward fits a quarter of ``max_memory`` or
    of the free memory (and there are at most ``_MAX_PAUSED`` batches: one worker thread each)."""
    if staged is not None:
        return staged
    if len(hidden) > _MAX_PAUSED:
        return False
    if max_memory is not None:
        free = max_memory
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        from ..core.memory import available_memory  # read at call time (tests patch it)

        free = available_memory()
    return paused_bytes(layer, hidden) <= free // 4


def _calibrate_staged(run_batch: Callable[[int], torch.Tensor], n_batches: int,
                      pending: Sequence[tuple[str, nn.Module, float]], done: dict[str, float],
                      device: torch.device, keep_outputs: bool) -> tuple[list[torch.Tensor] | None, list[str]]:
    """Every pending target's threshold into ``done`` with one paused forward per batch (:func:`run_staged`)."""
    hists = {full: AbsHistogram(device=device) for full, _, _ in pending}
    targets = {full: s for full, _, s in pending}
    # per batch: the input binned last (weakly: it must not outlive the forward) and its non-empty bins
    last: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}

    def record(full: str, x: torch.Tensor, b: int) -> None:
        if b not in last or last[b][0]() is not x:  # q/k/v (and gate/up) share one input tensor: bin it once
            counts = hists[full].bin_counts(x)
            bins = counts.nonzero().squeeze(1)  # a few thousand of 2^18: cheap to keep for every batch
            last[b] = (weakref.ref(x), bins, counts[bins])
        hists[full].add_bins(last[b][1], last[b][2], x.numel())

    def finalize(full: str) -> float:
        hists[full].all_reduce()
        done[full] = hists[full].threshold(targets[full])
        return done[full]

    return run_staged(run_batch, n_batches, [(full, mod) for full, mod, _ in pending], record, finalize,
                      torch.nn.functional.hardshrink, keep_outputs)


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
    from ..checkpoint.io import read_recipe

    entry = read_recipe(folder).get("activation_sparsity")
    if not isinstance(entry, dict) or not isinstance(entry.get("thresholds"), dict):
        raise ValueError(f"{folder} holds no activation-sparsity thresholds (saved without --activation-sparsity)")
    return {str(k): float(v) for k, v in entry["thresholds"].items()}
