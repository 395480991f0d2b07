"""Streamed structured pruning (:func:`prune_streaming`): the scoring and cutting passes over a layer stream."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..calibration.calibrate import CalibrationError, as_batches, layerwise_statistics
from ..core.config import PruneConfig, PrunePlan
from ..checkpoint.dispatched import ModelSource
from .source import build_skeleton, Checkpoint, memory_budget, StreamingError
from .resume import _fingerprint, PartialOutput
from .layers import LayerStream
from .shards import _finish


@dataclass
class StreamResult:
    out: Path
    plan: PrunePlan | None
    params_before: int
    params_after: int
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    #: the settings that ran (the attention unit and the allocation resolved)
    config: Any = None


def _count(model: nn.Module) -> int:
    from ..structured.pipeline import count_parameters

    return count_parameters(model)


# ---- structured pruning ------------------------------------------------------------------------------------
def prune_streaming(source: str | os.PathLike | nn.Module, config: PruneConfig, out: str | os.PathLike,
                    tokenizer: Any = None, calibration: Any = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, resume: bool = False, overwrite: bool = False,
                    max_memory: int | None = None, progress: bool = True,
                    extra: dict[str, Any] | None = None) -> StreamResult:
    """Structured pruning of ``source`` into the checkpoint folder ``out``, one layer in memory at a time.

    ``source`` is a checkpoint folder, or a loaded model, typically one dispatched with accelerate
    (``device_map`` with ``"cpu"`` / ``"disk"`` entries, ``cpu_offload``): its weights are read one layer at a
    time from its parameters and offload hooks (:class:`llmprune.checkpoint.dispatched.ModelSource`) and the model is
    left unchanged; layers run on its hooks' execution device unless ``device`` is given.
    The same settings as :func:`llmprune.prune` (the default ``obs`` with its ``fisher`` allocation, ``error`` /
    ``block_influence`` / ``global`` allocations,
    ``reconstruct``, bias compensation) give the same tensors. Not streamed (clear error): criteria with
    their own gradient pass (``taylor``, ``single-unit``), layer removal, MoE experts and vocabulary pruning.
    """
    import time

    from ..structured.criteria import get_criterion
    from ..structured.select import check_ratios, resolve_config

    t0 = time.perf_counter()
    config.validate()
    criterion = get_criterion(config.method)
    if not criterion.streams:
        raise StreamingError(f"method {config.method!r} takes its own pass through the whole model; it cannot be "
                             "streamed layer by layer (use the default obs, or wanda / flap / magnitude, or prune in "
                             "memory)")
    from ..structured.criteria import get_unit_criterion

    # the other unit kinds' criteria declare whether they stream (none does yet)
    asked = [kind for kind, n in (("layers", config.layers), ("experts", config.experts)) if n]
    if not all(get_unit_criterion(kind).streams for kind in asked):
        raise StreamingError("layer and expert removal are not streamed yet; prune in memory")
    if config.vocab and not get_unit_criterion("vocab").streams:
        raise StreamingError("vocabulary pruning (--vocab) is not streamed yet: the embedding and LM head are cut and "
                             "the tokenizer rewritten in memory; prune in memory")
    if (config.hidden or config.params) and not get_unit_criterion("hidden", config.hidden_method).streams:
        raise StreamingError("hidden-dimension pruning (--hidden, --params) is not streamed: its channels are chosen "
                             "on every layer's norms at once and cut in every layer; prune in memory")
    model, ck, prefixes = build_skeleton(source, dtype)
    device = device if device is not None else ck.execution_device
    adapter = get_adapter(model)
    if any(adapter.experts(layer) is not None for layer in adapter.decoder_layers(model)):
        raise StreamingError("mixture-of-experts models are not streamed yet; prune in memory")
    dt = next(p for p in model.parameters() if p.device.type != "meta").dtype
    config = resolve_config(model, adapter, config)  # "auto" unit, default allocation -> concrete, once
    run = (extra or {}).get("run")
    if isinstance(run, dict) and isinstance(run.get("prune"), dict):  # the CLI's recipe names what ran too
        extra = {**extra, "run": {**run, "prune": config.to_dict()}}
    check_ratios(model, adapter, config)
    prunes_units = config.heads > 0 or config.ffn > 0
    needs_data = (criterion.needs_calibration or config.bias_compensation or config.reconstruct
                  or config.allocation in ("error", "block_influence")) and prunes_units
    batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
    if needs_data and batches is None:
        raise CalibrationError(f"method {config.method!r} with these settings needs calibration data: pass "
                               "calibration=<text file> (CLI: --calib FILE)")
    params_before = _count(model)
    part = PartialOutput(out, _fingerprint(ck, {"prune": config.to_dict()}, batches, dt), resume,
                         overwrite)
    _announce(ck, len(adapter.decoder_layers(model)), max_memory, batches if needs_data else None, model,
              progress)
    spill = _spill_bytes(max_memory)
    stream = lambda phase, write, on_leave=None: LayerStream(model, ck, prefixes, part, phase, write, dt, spill,
                                                             on_leave)
    layers = adapter.decoder_layers(model)
    from ..checkpoint.perlayer import set_config_widths

    if criterion.run is not None and prunes_units:  # the method's own passes, each over its own layer stream
        from .resume import DiskStore

        plan = criterion.run(model, adapter, config, batches, device, progress,
                             streams=lambda phase: stream(phase, phase == "cut"), store=DiskStore(part, spill))
    elif config.reconstruct and prunes_units:
        from ..structured.compensate import enable_biases, zero_deltas
        from ..structured.sequential import prune_sequential
        from ..arch.surgery import prune_layer

        plan = None
        if config.allocation != "uniform":  # a scoring pass decides each layer's counts first
            plan = _scoring_pass(model, adapter, config, batches, stream, part, device, progress, prunes_units)
        if config.bias_compensation:
            enable_biases(adapter, model, zero_deltas(adapter, model))
        io = stream("cut", True)
        for i, lp in io.plans.items():  # resumed: finished layers take their cut shapes on the meta device
            prune_layer(adapter, layers[i], lp)
        plan = prune_sequential(model, adapter, config, batches, plan, device=device, progress=progress,
                                layer_io=io)
    else:
        plan = _scoring_pass(model, adapter, config, batches if needs_data else None, stream, part, device,
                             progress, prunes_units)
        plan = _cutting_pass(model, adapter, config, plan, stream, part, progress)
        set_config_widths(model, adapter)
    params_after = _count(model)
    meta = dict(config=config, plan=plan, source=ck.name,
                extra={"params_before": params_before, "params_after": params_after, "streamed": True,
                       **(extra or {})})
    path = _finish(model, part, prefixes, ck, tokenizer, meta)
    return StreamResult(path, plan, params_before, params_after, time.perf_counter() - t0, config=config)


def _announce(ck: Checkpoint | ModelSource, n_layers: int, max_memory: int | None, batches: Any, model: nn.Module,
              progress: bool) -> None:
    """One line before the per-layer progress bars: what is streamed and the memory budget."""
    if not progress:
        return
    budget = memory_budget(max_memory)
    hidden = 0
    if batches:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        width = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
        size = next(p for p in model.parameters() if p.device.type != "meta").element_size()
        hidden = sum(b.numel() for b in batches) * width * size
    where = "spilled to disk" if 2 * hidden > _spill_bytes(max_memory) else "in memory"
    print(f"llmprune: streaming {Path(ck.name).name}: {n_layers} layers, weights {ck.nbytes / 1e9:.2f} GB, "
          f"memory budget {budget / 1e9:.2f} GB, calibration states {hidden / 1e6:.0f} MB ({where})", flush=True)


def _spill_bytes(max_memory: int | None) -> int:
    """Hidden states larger than a quarter of the budget are memory-mapped from the run folder."""
    return memory_budget(max_memory) // 4


def _scoring_pass(model, adapter, config, batches, stream, part, device, progress, prunes_units) -> PrunePlan:
    """Pass 1: every layer's scores (and cost curves / Block Influence / compensation means) are computed
    while it is loaded and kept on disk (the resume point); then the plan is made as in memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..core.allocate import CostCurve
    from ..calibration.calibrate import LayerStats
    from ..structured.score import LayerScores, score_layer
    from ..structured.select import plan_pruning
    from ..structured.allocation import block_influence_counts, error_counts, layer_cost_curves
    from ..structured.sequential import output_modules

    error_alloc = config.allocation == "error" and prunes_units
    n = len(adapter.decoder_layers(model))

    def save(i: int, layer: nn.Module, stats: LayerStats | None) -> None:
        s = score_layer(adapter, layer, config, stats)
        tensors = {f: getattr(s, f).contiguous() for f in ("q_heads", "kv_heads", "neurons", "expert_neurons",
                                                            "experts") if getattr(s, f) is not None}
        meta = {"group_size": s.group_size, "block_influence": s.block_influence,
                "stats_block_influence": stats.block_influence if stats is not None else None}
        if error_alloc:
            curves = layer_cost_curves(adapter, layer, config, s, stats)
            meta["curves"] = [None if c is None else {"unit_params": c.unit_params, "cost": c.cost} for c in curves]
            stats.grams.clear()
        if config.bias_compensation and stats is not None:  # means of the output projections' inputs
            for k, m in enumerate(output_modules(adapter, layer)):
                tensors[f"mean.{k}"] = stats.inputs[m].mean.contiguous()
        save_file(tensors, str(part.dir / f"score-{i:05d}.safetensors"), metadata={"json": json.dumps(meta)})

    if batches is not None:
        io = stream("score", False)
        if io.start < n:
            layerwise_statistics(model, adapter, batches, device=device, progress=progress,
                                 on_layer=lambda i, layer, st: save(i, layer, st), rerun=False, layer_io=io,
                                 grams_of=(lambda layer: output_modules(adapter, layer)) if error_alloc else None)
    else:
        io = stream("score", False, lambda i, layer: save(i, layer, None))
        for i in range(io.start, n):  # no data: scores from the weights alone
            io.enter(i, io.layers[i])
            io.leave(i, io.layers[i], [])
    scores, curves, block_influence, means = [], [], [], []
    for i in range(n):
        with safe_open(str(part.dir / f"score-{i:05d}.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["json"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        scores.append(LayerScores(q_heads=t.get("q_heads"), kv_heads=t.get("kv_heads"), neurons=t.get("neurons"),
                                  expert_neurons=t.get("expert_neurons"), experts=t.get("experts"),
                                  group_size=meta["group_size"], block_influence=meta["block_influence"]))
        block_influence.append(meta["stats_block_influence"])
        if error_alloc:
            curves.append(tuple(None if c is None else CostCurve(c["unit_params"], c["cost"]) for c in meta["curves"]))
        means.append([t[k] for k in sorted(k for k in t if k.startswith("mean."))])
    counts = None
    if error_alloc:
        counts = error_counts(model, adapter, config, curves)
    elif config.allocation == "block_influence" and prunes_units:
        counts = block_influence_counts(model, adapter, config, block_influence)
    plan = plan_pruning(model, adapter, config, scores, counts)
    part.compensation_means = means  # type: ignore[attr-defined]
    return plan


def _cutting_pass(model, adapter, config, plan, stream, part, progress) -> PrunePlan:
    """Pass 2 without reconstruction: load, compensate, cut, write, free (no calibration needed)."""
    from ..calibration.calibrate import InputStats, LayerStats
    from ..structured.compensate import Delta, add_deltas, enable_biases, layer_deltas
    from ..core.progress import progress_bar
    from ..structured.sequential import output_modules
    from ..arch.surgery import prune_layer

    layers = adapter.decoder_layers(model)
    if config.bias_compensation:  # shapes only: which projections need a bias the checkpoint lacks
        placeholders = []
        for layer, lp in zip(layers, plan.layers):
            for kind, spec, kept in (("attention", adapter.attention(layer), lp.kept_heads),
                                     ("ffn", adapter.ffn(layer), lp.kept_neurons)):
                if spec is not None and kept is not None:
                    placeholders.append(Delta(spec.output.module, kind, torch.zeros(0)))
        enable_biases(adapter, model, placeholders)

    def cut(i: int, layer: nn.Module) -> None:
        deltas = []
        if config.bias_compensation:
            stats = LayerStats()
            for m, mean in zip(output_modules(adapter, layer), part.compensation_means[i]):
                stats.inputs[m] = InputStats(count=1, sum=mean)
            deltas = layer_deltas(adapter, layer, plan.layers[i], stats)
        with torch.no_grad():
            prune_layer(adapter, layer, plan.layers[i])
        add_deltas(deltas)

    io = stream("cut", True, cut)
    for i in range(io.start):
        with torch.no_grad():
            prune_layer(adapter, layers[i], plan.layers[i])  # meta: finished layers' shapes
    for i in progress_bar(range(io.start, len(layers)), desc="cutting layers", disable=not progress,
                          total=len(layers), initial=io.start):
        io.enter(i, layers[i])
        io.leave(i, layers[i], [])
    return plan
