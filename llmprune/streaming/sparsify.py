"""Streamed weight and activation sparsity (:func:`sparsify_streaming`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..calibration.calibrate import CalibrationError, as_batches
from ..checkpoint.dispatched import ModelSource
from .source import build_skeleton, Checkpoint, StreamingError
from .resume import _fingerprint, PartialOutput
from .layers import LayerStream
from .shards import _finish
from .prune import _announce, _count, prune_streaming, _spill_bytes, StreamResult


# ---- weight sparsity ---------------------------------------------------------------------------------------
def sparsify_streaming(source: str | os.PathLike | nn.Module, config: Any, out: str | os.PathLike,
                       tokenizer: Any = None, calibration: Any = None, device: str | torch.device | None = None,
                       dtype: torch.dtype | str | None = None, resume: bool = False, overwrite: bool = False,
                       max_memory: int | None = None, progress: bool = True,
                       extra: dict[str, Any] | None = None, activation_sparsity: float = 0.0,
                       activation_method: str = "teal") -> StreamResult:
    """Weight sparsity (:func:`llmprune.sparsity.sparsify`) of ``source`` (a checkpoint folder or a loaded,
    possibly dispatched model, as in :func:`prune_streaming`) into ``out``, one layer at a time; the same
    tensors as in memory. An allocation or method registered with ``streams=False`` is refused (OWL: it needs every
    layer's outliers first).

    ``activation_sparsity`` > 0: a second streamed pass over the sparsified layers calibrates the thresholds of the
    registered ``activation_method`` (``teal``: :func:`llmprune.sparsity.calibrate_activation_thresholds` on the
    same calibration windows and targets: the thresholds of the in-memory sparsified model), stored with the output
    as ``sparsify --activation-sparsity`` stores them and returned in ``report["activation_sparsity"]``."""
    import time

    from ..sparsity._common import layer_targets
    from ..sparsity.api import SparsityConfig, _prune_module, _sequential
    from ..sparsity.registry import get_activation_method, get_sparsity_allocation, get_sparsity_method

    t0 = time.perf_counter()
    config = SparsityConfig.from_dict(config) if isinstance(config, dict) else config
    config.validate()
    if not get_sparsity_allocation(config.allocation).streams:
        raise StreamingError(f"allocation {config.allocation!r} is not streamed yet; use uniform or sparsify in memory")
    method = get_sparsity_method(config.method)
    if not method.streams:
        raise StreamingError(f"method {config.method!r} is not streamed; sparsify in memory")
    act_method = get_activation_method(activation_method)
    if activation_sparsity and not act_method.streams:
        raise StreamingError(f"activation-sparsity method {activation_method!r} is not streamed; sparsify in memory")
    model, ck, prefixes = build_skeleton(source, dtype)
    device = device if device is not None else ck.execution_device
    adapter = get_adapter(model)
    dt = next(p for p in model.parameters() if p.device.type != "meta").dtype
    layers = adapter.decoder_layers(model)
    targets = layer_targets(model, layers, config.targets)
    if not any(targets):
        raise ValueError(f"targets={config.targets} match no linear layer inside the decoder blocks")
    if isinstance(activation_sparsity, bool) or not 0.0 <= float(activation_sparsity) < 1.0:
        raise ValueError(f"activation_sparsity={activation_sparsity!r} must be a fraction in [0, 1)")
    batches = None
    if config.needs_calibration or activation_sparsity > 0:
        batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
        if batches is None:
            needs = f"method {config.method!r}" if config.needs_calibration else "activation sparsity"
            raise CalibrationError(f"{needs} needs calibration data: pass calibration=<text file>")
    settings: dict[str, Any] = {"sparsify": config.to_dict()}
    if activation_sparsity > 0:
        settings["activation_sparsity"] = float(activation_sparsity)
        settings["activation_method"] = act_method.name
    part = PartialOutput(out, _fingerprint(ck, settings, batches, dt), resume, overwrite)
    _announce(ck, len(layers), max_memory, batches, model, progress)
    report = part.state.setdefault("report", {})

    def count(i: int, layer: nn.Module) -> None:
        for name, mod in targets[i]:
            w = mod.weight
            report[name] = [int((w == 0).sum()), w.numel()]

    io = LayerStream(model, ck, prefixes, part, "sparsify", True, dt, _spill_bytes(max_memory), count)
    if config.sparsity > 0 and method.needs_calibration:
        if io.start < len(layers):
            _sequential(model, adapter, targets, batches, config, progress, device, [config.sparsity] * len(layers),
                        layer_io=io)
    else:
        for i in range(io.start, len(layers)):
            io.enter(i, layers[i])
            if config.sparsity > 0:
                for _, mod in targets[i]:
                    _prune_module(mod, config, None, config.sparsity)
            io.leave(i, layers[i], [])
    zeros = sum(z for z, _ in report.values())
    total = sum(t for _, t in report.values())
    summary = {"config": config.to_dict(), "layers": {k: z / max(t, 1) for k, (z, t) in report.items()},
               "overall_sparsity": zeros / max(total, 1), "pruned_weights": zeros, "total_weights": total}
    act_extra = {}
    if activation_sparsity > 0:
        thresholds = _activation_pass(model, ck, prefixes, part, dt, max_memory, batches, float(activation_sparsity),
                                      config.targets, device, progress, act_method.calibrate)
        summary["activation_sparsity"] = act_extra["activation_sparsity"] = {
            "target": float(activation_sparsity), "thresholds": thresholds}
    params = _count(model)
    meta = dict(config=None, plan=None, source=ck.name,
                extra={"sparsity_config": config.to_dict(), "overall_sparsity": summary["overall_sparsity"],
                       "streamed": True, **act_extra, **(extra or {})})
    path = _finish(model, part, prefixes, ck, tokenizer, meta)
    return StreamResult(path, None, params, params, time.perf_counter() - t0, summary)


def _activation_pass(model: nn.Module, ck: Checkpoint | ModelSource, prefixes: dict[int, str], part: PartialOutput,
                     dtype: torch.dtype, max_memory: int | None, batches: list[torch.Tensor], sparsity: float,
                     targets: list[str], device: Any, progress: bool, calibrate: Any) -> dict[str, float]:
    """Activation-sparsity thresholds (``calibrate``: the registered method's) of the layers the weight pass wrote,
    read back one at a time (resumable: finished layers' thresholds are kept in the run's state)."""
    saved = part.state.setdefault("activation", {}).setdefault("thresholds", {})
    io = LayerStream(model, ck, prefixes, part, "activation", False, dtype, _spill_bytes(max_memory), read_output=True)
    if io.start < len(io.layers):
        calibrate(model, calibration=batches, sparsity=sparsity, targets=targets, progress=progress, device=device,
                  max_memory=max_memory, layer_io=io, on_layer=lambda i, th: saved.update(th))
    return dict(saved)
