"""One forward pass of a decoder layer per calibration batch, paused at each target until its threshold exists.

Sequential activation-sparsity calibration needs, for every target linear of a layer, its inputs over all
calibration batches with every earlier threshold of the same layer applied (q/k/v's before o_proj's, and so
on). Re-running the layer once per stage recomputes each stage's prefix. Here each batch's forward runs in
its own worker thread instead and stops in a target's forward pre-hook until every batch has reached that
target and its threshold has been computed from all of their inputs; then the batches go on, their input
to the target sparsified. Each layer thus runs once per batch, and its outputs are the next layer's inputs.

Workers never run concurrently: the calling thread resumes them one at a time, and each runs until it
reaches a target without a threshold, or finishes; so the arithmetic is that of a plain loop over the
batches (and so is the order of the recorded inputs, unless batches take different paths). The price is memory: every batch's forward is held paused at
once (:func:`paused_bytes` estimates it; the caller re-runs stages instead when it does not fit).

When batches wait at different targets (data-dependent routing: MoE experts some batches never reach), the
target registered first in the layer is calibrated first, on the inputs recorded so far.

Example::

    outs, unreached = run_staged(lambda b: layer(hidden[b]), len(hidden), [("mlp.down_proj", down)],
                                 record=lambda full, x, b: hist.update(x), finalize=lambda full: hist.threshold(0.5),
                                 sparsify=torch.nn.functional.hardshrink, keep_outputs=True)
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["run_staged", "paused_bytes"]


class _Abort(Exception):
    """Raised inside a paused worker to unwind its forward (calibration done, or failed elsewhere)."""


class _Worker:
    def __init__(self, batch: int):
        self.batch = batch
        self.go: queue.SimpleQueue = queue.SimpleQueue()
        self.state = "new"  # new -> running <-> waiting -> finished
        self.waiting_for: str | None = None
        self.out: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None


def run_staged(
    run_batch: Callable[[int], torch.Tensor],
    n_batches: int,
    pending: Sequence[tuple[str, nn.Module]],
    record: Callable[[str, torch.Tensor, int], None],
    finalize: Callable[[str], float],
    sparsify: Callable[[torch.Tensor, float], torch.Tensor],
    keep_outputs: bool,
) -> tuple[list[torch.Tensor] | None, list[str]]:
    """Run ``run_batch(b)`` for every batch, calibrating each of ``pending``'s targets on the way.

    ``record(full, x, b)`` gets a target's input on batch ``b`` (before its threshold exists);
    ``finalize(full)`` returns the threshold once every batch that reaches the target has recorded;
    ``sparsify(x, t)`` is applied to the target's input from then on (``t > 0``). Returns the outputs
    in batch order (``None`` unless ``keep_outputs``; without them the forwards stop once every target is
    calibrated) and the targets no batch reached.
    """
    order = {full: i for i, (full, _) in enumerate(pending)}
    thresholds: dict[str, float] = {}
    reports: queue.SimpleQueue = queue.SimpleQueue()
    local = threading.local()
    aborted = threading.Event()
    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread

    def hook(module: nn.Module, args: tuple, full: str):
        worker = getattr(local, "worker", None)
        if worker is None:  # a forward outside this calibration (another thread): leave it alone
            return None
        x = args[0]
        if full not in thresholds:
            record(full, x, worker.batch)
            worker.state, worker.waiting_for = "waiting", full
            reports.put(worker)
            worker.go.get()
            if aborted.is_set():
                raise _Abort
        t = thresholds[full]
        return (sparsify(x, t),) + tuple(args[1:]) if t > 0 else None

    def body(worker: _Worker) -> None:
        local.worker = worker
        worker.go.get()
        try:
            if aborted.is_set():
                raise _Abort
            with torch.set_grad_enabled(grad_enabled):
                worker.out = run_batch(worker.batch)
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001  re-raised in the calling thread
            worker.error = e
        finally:
            worker.state = "finished"
            reports.put(worker)

    def resume(worker: _Worker) -> None:
        worker.state, worker.waiting_for = "running", None
        worker.go.put(None)
        reported = reports.get()  # the only worker running reports back: waiting or finished
        assert reported is worker
        if worker.error is not None:
            raise worker.error

    workers = [_Worker(b) for b in range(n_batches)]
    handles = [mod.register_forward_pre_hook(lambda m, a, full=full: hook(m, a, full)) for full, mod in pending]
    try:
        for worker in workers:
            worker.thread = threading.Thread(target=body, args=(worker,), daemon=True,
                                             name=f"llmprune-calibration-batch-{worker.batch}")
            worker.thread.start()
            resume(worker)
        while True:
            waiting = [w for w in workers if w.state == "waiting"]
            if not waiting:
                break
            full = min({w.waiting_for for w in waiting}, key=order.__getitem__)
            thresholds[full] = finalize(full)
            if not keep_outputs and len(thresholds) == len(order):
                break  # nothing left to record: the paused forwards are unwound below
            for w in waiting:
                if w.waiting_for == full:
                    resume(w)
    finally:
        aborted.set()
        for w in workers:
            if w.state == "running":  # interrupted while it ran (KeyboardInterrupt): let it report first
                reports.get()
            if w.state == "waiting":
                w.go.put(None)
                reports.get()
            elif w.state == "new" and w.thread is not None:
                w.go.put(None)
        for w in workers:
            if w.thread is not None:
                w.thread.join()
        for h in handles:
            h.remove()
    outs = [w.out for w in workers] if keep_outputs else None
    return outs, [full for full in order if full not in thresholds]


def paused_bytes(layer: nn.Module, hidden: Sequence[torch.Tensor]) -> int:
    """Rough upper bound of what :func:`run_staged` holds at once: every calibration token with one value
    per output feature of each of ``layer``'s linear layers, in the hidden states' dtype (a paused forward
    keeps at most the outputs of the linears it has passed, plus a few hidden-size tensors)."""
    tokens = sum(h.numel() // max(h.shape[-1], 1) for h in hidden)
    width = sum(m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[-1]
                for m in layer.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    size = hidden[0].element_size() if hidden else 4
    return tokens * width * size
