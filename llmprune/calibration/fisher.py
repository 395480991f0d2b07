"""The empirical Fisher of the loss with respect to each projection's output (pure statistics gathering).

For the output ``y = W x`` of a projection that writes into the residual stream (o_proj, down_proj: the
adapter's ``output`` slots), the Kronecker-factored second-order estimate of how much a weight change
``ΔW`` raises the summed token loss is ``ΔL ≈ ½ tr(F ΔW G ΔWᵀ)``, with ``G = Σ_t x_t x_tᵀ`` the input Gram
matrix and ``F = mean_t g_t g_tᵀ``, ``g_t = ∂L/∂y_t`` (K-FAC, Martens & Grosse 2015; used for pruning by the
LLM Surgeon, van der Ouderaa et al. 2024). ``F`` is what makes a removal in layer 2 and one in layer 28
comparable: a plain output error ignores that the residual stream, and the loss's sensitivity to it,
differ by orders of magnitude between layers.

One forward and backward pass of the whole model over ``batches``, taken one decoder layer at a time (so a
streamed model never needs more than one layer in memory; no weight gradients are kept: only the output
gradients are read, by hooks). ``diagonal=True`` keeps ``diag(F)`` only: ``hidden`` floats per
projection instead of ``hidden²``, for models whose full factors would not fit.

Example::

    fisher = output_fisher(model, adapter, batches[:2])       # fisher[i] == {o_proj: F, down_proj: F} of layer i
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from ..core.distributed import all_reduce_sum, world
from .engine import LayerIO, _forward_kwargs, capture_layer_inputs, run_layer

__all__ = ["output_fisher", "output_modules_of", "FisherStore", "LayerFisher"]


def output_modules_of(adapter: ArchAdapter, layer: nn.Module) -> list[nn.Module]:
    out = []
    for spec in (adapter.attention(layer), adapter.ffn(layer)):
        if spec is not None and isinstance(spec.output.module, nn.Module) and spec.output.module not in out:
            out.append(spec.output.module)
    return out


class FisherStore:
    """Where the Fisher pass keeps what outlives one layer: the hidden states entering every layer, the
    gradients flowing back, and each layer's finished Fisher. This base keeps them in memory; a streamed run
    keeps them in its run folder (:class:`llmprune.streaming.resume.DiskStore`), where ``state`` and
    :meth:`commit` make the pass resumable layer by layer."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self._tensors: dict[str, list[torch.Tensor]] = {}

    def put(self, key: str, tensors: list[torch.Tensor]) -> None:
        self._tensors[key] = tensors

    def get(self, key: str) -> list[torch.Tensor]:
        return self._tensors[key]

    def drop(self, key: str) -> None:
        self._tensors.pop(key, None)

    def commit(self) -> None:
        """Persist ``state`` (a no-op in memory)."""


class LayerFisher:
    """Per decoder layer, ``{output module: F}``, read from a :class:`FisherStore` when a layer asks for it (a
    streamed run never holds every layer's ``hidden²`` matrices at once)."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, store: FisherStore, tokens: int):
        self.layers, self.adapter, self.store, self.tokens = adapter.decoder_layers(model), adapter, store, tokens

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> dict[nn.Module, torch.Tensor]:
        mods = output_modules_of(self.adapter, self.layers[i])
        return {m: f / max(self.tokens, 1) for m, f in zip(mods, self.store.get(f"fisher-{i}"))}


def output_fisher(model: nn.Module, adapter: ArchAdapter, batches: list[torch.Tensor], diagonal: bool = False,
                  device: Any = None, labels: str = "model", seed: int = 0, layer_io: Any = None,
                  store: FisherStore | None = None) -> LayerFisher | None:
    """Per decoder layer, ``{output module: F}`` (float64 on CPU, ``[out, out]``, or ``[out]`` when
    ``diagonal``), from the next-token loss on ``batches``. ``None`` for models without a language-model head
    (encoders): callers then weigh output errors plainly.

    ``labels="model"``: next tokens sampled from the model's own prediction at each position (one per
    position, seeded by ``seed``): a Monte-Carlo estimate of the *true* Fisher, the curvature of the KL
    divergence from the unpruned model. ``labels="data"``: the loss of the text's own next tokens (the
    *empirical* Fisher).

    The backward pass runs one decoder layer at a time, so it needs one layer in memory, as every other pass:
    a forward pass keeps the hidden states entering each layer (in ``store``), the LM head turns the last ones
    into the loss's gradient, and each layer, from the last, recomputes its forward on its saved inputs and
    passes the gradient back. ``layer_io`` (:class:`~llmprune.calibration.calibrate.LayerIO`) loads and
    releases each layer's weights (streaming); ``store`` keeps the states and the finished Fisher of each
    layer (in memory by default; a streamed run's folder, where a killed pass resumes at its last layer)."""
    if labels not in ("data", "model"):
        raise ValueError(f"labels={labels!r}; choose data or model")
    io = layer_io or LayerIO()
    store = store if store is not None else FisherStore()
    st = store.state
    layers = adapter.decoder_layers(model)
    n = len(layers)
    home = next(p for p in model.parameters() if p.device.type != "meta").device
    dev = torch.device(device) if device is not None else home
    # one window at a time, as a whole-model pass would take them: the logits, their softmax and its gradient
    # are [tokens, vocab] each, and the same shapes keep the sums equal whatever the batch size
    windows = [w for b in batches for w in b.split(1)]
    requires = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():  # only activation gradients are needed; no weight gradient is stored
            p.requires_grad_(False)
        io.enter(0, layers[0])  # the capture probes layer 0 once
        captured = capture_layer_inputs(model, adapter, windows)
        if st.get("forward_next", 0) > 0:
            io.release(0, layers[0])
        # 1. forward, keeping each layer's inputs
        start = st.get("forward_next", 0)
        if start == 0:
            store.put("in-0", captured.hidden)
        hidden = store.get(f"in-{start}") if start < n else []
        for i in range(start, n):
            io.enter(i, layers[i])
            layer = layers[i].to(dev)
            with torch.no_grad():
                hidden = [run_layer(layer, h, *captured.layer_args[i][w], dev).to(home) for w, h in enumerate(hidden)]
            layers[i].to(home)
            io.release(i, layers[i])
            store.put(f"in-{i + 1}", hidden)
            st["forward_next"] = i + 1
            store.commit()
        # 2. the LM head: the loss's gradient with respect to the last hidden states
        if "tokens" not in st:
            grads, tokens = _head_gradients(model, adapter, windows, store.get(f"in-{n}"), captured.returns_tuple,
                                            labels, seed)
            if grads is None:
                return None
            tokens = int(_reduce_over_processes([torch.tensor([float(tokens)], dtype=torch.float64)], dev)[0].item())
            store.put("grad", grads)
            st.update(tokens=tokens, backward_next=n - 1)
            store.commit()
        # 3. backward, one layer at a time from the last, recomputing each layer's forward on its saved inputs
        for i in range(st["backward_next"], -1, -1):
            io.enter(i, layers[i])
            layer = layers[i].to(dev)
            grads, fisher = _layer_backward(adapter, layer, store.get(f"in-{i}"), store.get("grad"),
                                            captured.layer_args[i], diagonal, dev)
            layers[i].to(home)
            io.release(i, layers[i])
            store.put(f"fisher-{i}", _reduce_over_processes(fisher, dev))
            store.put("grad", [g.to(home) for g in grads])
            store.drop(f"in-{i + 1}")
            st["backward_next"] = i - 1
            store.commit()
        store.drop("in-0")
        store.drop("grad")
        store.commit()  # a streamed run's folder: the states' files go once the state no longer names them
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    return LayerFisher(model, adapter, store, st["tokens"])


#: positions whose logits exist at once in the head pass (and rows per draw of the model's own labels): the
#: logits, their softmax and its gradient are ``[positions, vocab]`` each, so a whole window at a 262k vocabulary
#: would be several GB
_HEAD_ROWS = 256


def _head_gradients(model: nn.Module, adapter: ArchAdapter, windows: list[torch.Tensor], last: list[torch.Tensor],
                    returns_tuple: bool, labels: str, seed: int) -> tuple[list[torch.Tensor] | None, int]:
    """``∂L/∂h`` of the summed next-token loss for each window's last hidden states ``h``. The model itself
    computes the logits (its final norm, LM head and any soft-capping): its first decoder layer returns ``h``
    and the others pass it on, so no family's head is written again here. Everything after the decoder layers
    acts on each position alone, so the window is taken ``_HEAD_ROWS`` positions at a time."""
    layers = adapter.decoder_layers(model)
    gen = torch.Generator().manual_seed(int(seed))
    vocab = model.get_input_embeddings().num_embeddings
    fed: list[torch.Tensor] = []

    def first(*args: Any, **kwargs: Any) -> Any:
        return (fed[0],) if returns_tuple else fed[0]

    def through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if returns_tuple else hidden_states

    grads, tokens = [], 0
    for k, layer in enumerate(layers):
        layer.forward = first if k == 0 else through
    try:
        for w, window in enumerate(windows):
            h_all = last[w].detach()
            grad = torch.zeros_like(h_all)  # the last position predicts nothing: a chunk may end before it
            length = window.shape[1]
            for a in range(0, length - 1, _HEAD_ROWS):
                e = min(a + _HEAD_ROWS, length)  # the last chunk runs the final position too, as a whole window
                b = min(e, length - 1)           # would: positions a .. b-1 are scored
                h = h_all[:, a:e].clone().requires_grad_(True)
                fed[:] = [h]
                with torch.enable_grad():
                    out = model(window[:, a:e].to(h.device), **_forward_kwargs(model))
                    logits = getattr(out, "logits", None)
                    if logits is None or logits.shape[-1] != vocab:
                        return None, 0
                    flat = logits[:, :b - a].flatten(0, 1).float()
                    target = (_sample_next_tokens(flat.detach(), gen) if labels == "model"
                              else window[:, a + 1:b + 1].flatten().to(flat.device))
                    loss = F.cross_entropy(flat, target, reduction="sum")
                    grad[:, a:e] = torch.autograd.grad(loss, h)[0]
                del out, logits, flat, loss
            grads.append(grad)
            tokens += window.numel()
    finally:
        for layer in layers:
            del layer.forward
    return grads, tokens


def _layer_backward(adapter: ArchAdapter, layer: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                    layer_args: list, diagonal: bool,
                    dev: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One layer's share of the backward pass: the gradients entering it (``∂L/∂x``) and, for each output
    module, ``Σ_t g_t g_tᵀ`` of the gradients of its outputs."""
    mods = output_modules_of(adapter, layer)
    acc = [torch.zeros(weight_matrix(m).shape[0] if diagonal else (weight_matrix(m).shape[0],) * 2,
                       dtype=torch.float64) for m in mods]
    handles = []
    for k, m in enumerate(mods):
        def accumulate(grad: torch.Tensor, k: int = k) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).double()
            acc[k] += (g.pow(2).sum(0) if diagonal else g.t() @ g).cpu()

        def hook(module: nn.Module, args: Any, out: Any, accumulate=accumulate) -> None:
            # a hook on the output tensor, not a module backward hook: those wrap the output in a view that
            # in-place residual additions (Falcon's parallel attention) may not modify
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(accumulate)

        handles.append(m.register_forward_hook(hook))
    back = []
    try:
        for w, (x, g) in enumerate(zip(inputs, grads)):
            x = x.detach().to(dev).requires_grad_(True)
            with torch.enable_grad():
                y = run_layer(layer, x, *layer_args[w], dev)
                (gx,) = torch.autograd.grad(y, x, grad_outputs=g.to(y.device, y.dtype))
            back.append(gx)
    finally:
        for h in handles:
            h.remove()
    return back, acc


def _sample_next_tokens(logits: torch.Tensor, gen: torch.Generator, rows: int = _HEAD_ROWS) -> torch.Tensor:
    """One token per row of ``logits`` drawn from its softmax with the CPU generator ``gen`` (the same draw on
    every device), a few rows at a time: a whole window's probabilities would be another ``[tokens, vocab]``."""
    out = [torch.multinomial(torch.softmax(chunk.float(), dim=-1).cpu(), 1, generator=gen).reshape(-1)
           for chunk in logits.split(rows)]
    return torch.cat(out).to(logits.device)


def _reduce_over_processes(tensors: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
    """Under ``accelerate launch`` each process saw its own windows: sum the Fisher sums and the token counts
    over processes, so every process prices removals with the same Fisher (and so makes the same cuts)."""
    if world()[1] == 1:
        return tensors
    on = dev if dev.type == "cuda" else torch.device("cpu")  # NCCL reduces device tensors only
    return [t.cpu() for t in all_reduce_sum(*[t.to(on) for t in tensors])]
