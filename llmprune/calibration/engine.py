"""The layer-by-layer engine: the one loop over decoder layers that every calibration pass runs.

It captures what the model feeds its first decoder layer (and every layer's other arguments: attention masks,
rotary embeddings, per-layer sliding-window masks) without computing any decoder layer, then visits the layers
in order: each is loaded (its :class:`LayerIO`), moved to the device, handed to the caller with its inputs
(:class:`LayerStep`), and its outputs, computed by the caller or here, feed the next layer; the layer is then
released. Where layers come from and go (in memory; safetensors shards, written as they finish, with a resume
point: :class:`llmprune.streaming.LayerStream`; an accelerate offload) is the ``layer_io`` parameter.

Example::

    for step in layer_by_layer(model, adapter, batches):
        outs = step.forward()          # hooks on step.layer see its inputs
        ...                            # gather, change the layer
        step.outputs = outs            # or leave None: recomputed on the changed layer
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..arch import ArchAdapter
from ..core.progress import progress_bar

__all__ = ["LayerIO", "LayerStep", "CapturedInputs", "capture_layer_inputs", "run_layer", "layer_by_layer"]


class _StopForward(Exception):
    pass


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for models whose forward accepts it (decoders); nothing for encoders."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


@dataclass
class CapturedInputs:
    """Layer-0 hidden states per batch and, per layer and batch, the (args, kwargs) the model passed."""

    hidden: list[torch.Tensor]
    layer_args: list[list[tuple[tuple, dict]]]  # [layer][batch] -> (args, kwargs)
    returns_tuple: bool


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ArchAdapter, batches: list[torch.Tensor]) -> CapturedInputs:
    """Record what the model feeds each decoder layer without computing any decoder layer."""
    layers = adapter.decoder_layers(model)
    device = next(model.parameters()).device
    # Pass 1: learn whether a layer returns a tensor or a tuple (models index tuple outputs with [0]).
    first = layers[0]
    seen: dict[str, Any] = {}

    def probe(*args: Any, **kwargs: Any) -> Any:
        out = type(first).forward(first, *args, **kwargs)
        seen["tuple"] = isinstance(out, tuple)
        raise _StopForward

    fwd_kwargs = _forward_kwargs(model)
    first.forward = probe
    try:
        model(batches[0][:1].to(device), **fwd_kwargs)
    except _StopForward:
        pass
    finally:
        del first.forward
    returns_tuple = bool(seen.get("tuple", False))

    # Pass 2: every layer is a recording pass-through.
    hidden: list[torch.Tensor] = []
    layer_args: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def make_recorder(i: int) -> Callable[..., Any]:
        def record(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if i == 0:
                hidden.append(hidden_states)
            layer_args[i].append((args, kwargs))
            if all(len(a) == len(hidden) for a in layer_args):
                # every layer has this batch's inputs: skip the rest (final norm, and the LM head, whose
                # vocabulary-wide product costs as much as several decoder layers)
                raise _StopForward
            return (hidden_states,) if returns_tuple else hidden_states

        return record

    for i, layer in enumerate(layers):
        layer.forward = make_recorder(i)
    try:
        for batch in batches:
            try:
                model(batch.to(device), **fwd_kwargs)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return CapturedInputs(hidden, layer_args, returns_tuple)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, device: torch.device) -> torch.Tensor:
    """Run one decoder layer on ``device`` with recorded arguments; returns the hidden states."""
    out = layer(hidden.to(device), *_to(args, device), **_to(kwargs, device))
    return out[0] if isinstance(out, tuple) else out


class LayerIO:
    """Hooks around each decoder layer of a layer-by-layer pass. The in-memory path uses this no-op base;
    the streaming path (:mod:`llmprune.streaming`) reads a layer's weights from the checkpoint on
    :meth:`enter`, and on :meth:`leave` writes it if asked, frees it and saves the hidden states that feed
    the next layer (the resume point). ``start`` > 0 resumes a pass at that layer from ``initial_hidden``
    (``enter(0)`` also comes before the capture pass, which runs layer 0 once)."""

    start: int = 0

    def initial_hidden(self, captured: list[torch.Tensor]) -> list[torch.Tensor]:
        return captured

    def enter(self, i: int, layer: nn.Module) -> None:
        pass

    def leave(self, i: int, layer: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return hidden

    @property
    def records(self) -> dict[int, Any]:
        """What a pass keeps of each finished layer (JSON-able; a streamed run saves it as part of its resume
        point), e.g. the cost curves of the obs pricing pass."""
        return self.__dict__.setdefault("_records", {})

    def release(self, i: int, layer: nn.Module) -> None:
        """Drop layer ``i``'s weights without ending a pass (the Fisher's forward and backward visit each layer
        twice)."""


@dataclass
class LayerStep:
    """One decoder layer of a pass: the layer (on ``device``), the hidden states entering it (one per batch) and
    the recorded arguments of each batch. ``outputs``: what feeds the next layer (``None``: recomputed by
    :meth:`forward` once the caller is done, so a changed layer feeds its own outputs on)."""

    index: int
    layer: nn.Module
    inputs: list[torch.Tensor]
    args: list[tuple[tuple, dict]]
    device: torch.device
    outputs: list[torch.Tensor] | None = None

    def forward(self) -> list[torch.Tensor]:
        """The layer's outputs on every batch, as it is now."""
        return [run_layer(self.layer, h, *self.args[b], self.device) for b, h in enumerate(self.inputs)]


@torch.no_grad()  # a layer's autograd graph would keep its weights and activations alive
def layer_by_layer(model: nn.Module, adapter: ArchAdapter, batches: list[torch.Tensor],
                   device: torch.device | str | None = None, layer_io: LayerIO | None = None, progress: bool = True,
                   desc: str = "layers") -> Iterator[LayerStep]:
    """Visit the decoder layers of ``model`` in order with their calibration inputs (see the module docstring).
    With ``layer_io.start`` > 0 (a resumed streamed pass) the visit starts there, from the saved states."""
    layers = adapter.decoder_layers(model)
    home = next(p for p in model.parameters() if p.device.type != "meta").device
    device = torch.device(device) if device is not None else home
    io = layer_io or LayerIO()
    io.enter(0, layers[0])  # the capture pass runs layer 0's forward once to learn its output type
    captured = capture_layer_inputs(model, adapter, batches)
    hidden = io.initial_hidden(captured.hidden)
    for i in progress_bar(range(io.start, len(layers)), desc=desc, disable=not progress, total=len(layers),
                          initial=io.start):
        io.enter(i, layers[i])
        step = LayerStep(i, layers[i].to(device), hidden, captured.layer_args[i], device)
        yield step
        outs = step.outputs if step.outputs is not None else step.forward()
        hidden = [o.to(home) if device != home else o for o in outs]
        if device != home:
            layers[i].to(home)
        hidden = io.leave(i, layers[i], hidden)
