"""Calibration data and layer-by-layer statistics.

The pipeline keeps peak memory near one decoder layer plus its activations:

1. :func:`capture_layer_inputs` runs the model once with every decoder layer replaced by a pass-through
   that records the arguments the model hands it (attention mask, rotary embeddings, per-layer
   sliding-window masks, ...) and the layer-0 hidden states. No decoder layer is computed.
2. :func:`layerwise_statistics` then runs one layer at a time (optionally moved to ``device``), with
   forward pre-hooks on the layer's projections accumulating per-input-feature sums and squared sums,
   and feeds each layer's output to the next.

Example::

    batches = calibration_batches(tokenizer, text, n_samples=32, seq_len=256, seed=0)
    stats = layerwise_statistics(model, get_adapter(model), batches)
    stats[0].inputs[layer.mlp.down_proj].sq_norm   # ||X_j||^2 of down_proj's inputs in layer 0
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from ..core.progress import progress_bar
from ..core.stats import InputStats, LayerStats
from ..core.distributed import all_reduce_sum, world
from .hessian import CrossAccumulator, HessianAccumulator

__all__ = [
    "CalibrationError",
    "InputStats",
    "LayerStats",
    "read_calibration_text",
    "model_context",
    "calibration_state_bytes",
    "check_calibration_fits",
    "calibration_batches",
    "as_batches",
    "capture_layer_inputs",
    "run_layer",
    "layerwise_statistics",
    "LayerIO",
]


class CalibrationError(ValueError):
    """Calibration data is missing, empty or too short."""


def model_context(config: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` or its GPT-2 / Falcon names)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


#: Copies of the calibration hidden states a layer-by-layer pass holds at once: the layer's inputs and outputs.
CALIBRATION_STATE_COPIES = 2


def calibration_state_bytes(config: Any, n_samples: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """Memory of the hidden states layer-by-layer calibration keeps: windows x tokens x hidden x bytes x
    :data:`CALIBRATION_STATE_COPIES` (a lower bound: the model and one layer's activations come on top)."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or getattr(config, "d_model", 0))
    return n_samples * seq_len * hidden * dtype_bytes * CALIBRATION_STATE_COPIES


def check_calibration_fits(config: Any, n_samples: int, seq_len: int, budget: int | None = None,
                           dtype_bytes: int = 4, context: bool = True) -> None:
    """Refuse, before any calibration, windows longer than the model's context (with ``context``: the CLI's
    check; the library leaves RoPE models free to run past it) or calibration states larger than the memory
    budget (``budget`` bytes; default 80% of the available memory), each in one line.

    Example::

        check_calibration_fits(model.config, n_samples=128, seq_len=4096)   # CalibrationError on a 2k model
    """
    from ..core.memory import available_memory

    longest = model_context(config) if context else None
    if longest is not None and seq_len > longest:
        raise CalibrationError(f"calibration windows of {seq_len} tokens (--seq-len) are longer than the model's "
                               f"context of {longest} tokens: use --seq-len {longest} or less")
    need = calibration_state_bytes(config, n_samples, seq_len, dtype_bytes)
    budget = budget if budget is not None else int(0.8 * available_memory())
    if need > budget:
        raise CalibrationError(f"calibration would hold about {need / 1e9:.1f} GB of hidden states ({n_samples} "
                               "windows "
                               f"x {seq_len} tokens), more than the memory budget of {budget / 1e9:.1f} GB: lower "
                               "--n-samples or --seq-len, raise --max-memory, or use --streaming (which spills them "
                               "to disk)")


def read_calibration_text(source: str | os.PathLike) -> str:
    """Calibration text from a UTF-8 file or a dataset name (``wikitext2``, ``c4``, ``ptb``: train split),
    with clear errors for missing or empty files and unreachable datasets."""
    from .text import TextSourceError, load_text

    try:
        return load_text(source, split="train", purpose="calibration")
    except TextSourceError as err:
        raise CalibrationError(str(err)) from None
    except ValueError as err:
        raise CalibrationError(str(err)) from None


def _spread_order(n: int) -> list[int]:
    """A permutation of ``range(n)`` whose every prefix is spread evenly over it: bit-reversed counting
    (0, n/2, n/4, 3n/4, ...), skipping the values past ``n``."""
    bits = max(1, (n - 1).bit_length())
    order = (int(format(j, f"0{bits}b")[::-1], 2) for j in range(1 << bits))
    return [k for k in order if k < n]


def _stratified_offsets(span: int, n: int, gen: torch.Generator) -> list[int]:
    """``n`` offsets in ``[0, span)``, one uniformly inside each of ``n`` equal slices, the slices taken in a
    randomly rotated :func:`_spread_order` (slices of under one position, when ``n > span``, repeat offsets
    as independent draws would)."""
    edges = [k * span // n for k in range(n + 1)]
    u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    offsets = [lo + int(r * (hi - lo)) for lo, hi, r in zip(edges, edges[1:], u)]  # lo <= offset < max(hi, lo + 1)
    shift = int(torch.randint(0, n, (1,), generator=gen))
    return [offsets[(k + shift) % n] for k in _spread_order(n)]


def calibration_batches(
    tokenizer: Any,
    text: str,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Random ``seq_len``-token windows of ``text`` (as in SparseGPT/Wanda), grouped in batches.

    Stratified: each window starts at a random point of its own one of ``n_samples`` equal slices of the
    text, and the slices come in an order whose every prefix is spread over the whole text (so the Fisher's
    first windows are too). A file that concatenates corpora (Wikipedia, a novel, a play) is calibrated on
    each in proportion to its length whatever the seed, where independent draws let the mix wander (21 to 30
    play windows of 128 in reference-train over three seeds). It does not remove the seed spread of a pruned
    model's quality, which comes from which windows are drawn, not from the mix (BENCHMARKS.md, SmolLM2-135M).

    Long texts are not tokenised whole: each window starts at a character offset, a slice of text around
    it is tokenised, and its first token (possibly a cut word) is dropped. The same ``text`` and ``seed``
    always give the same windows.
    """
    if not text or not text.strip():
        raise CalibrationError("calibration text is empty")
    gen = torch.Generator().manual_seed(seed)

    def encode(chunk: str) -> list[int]:
        return tokenizer(chunk, return_attention_mask=False, add_special_tokens=False)["input_ids"]

    chunk_chars = seq_len * 16  # generous: real text averages well under 16 characters per token
    if len(text) <= 4 * chunk_chars:
        ids = torch.tensor(encode(text), dtype=torch.long)
        if ids.numel() < seq_len:
            raise CalibrationError(
                f"calibration text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
                "give more text or a smaller seq_len"
            )
        starts = _stratified_offsets(ids.numel() - seq_len + 1, n_samples, gen)
        windows = torch.stack([ids[s : s + seq_len] for s in starts])
    else:
        offsets = _stratified_offsets(len(text) - chunk_chars, n_samples, gen)
        rows = []
        for off in offsets:
            ids = encode(text[off : off + chunk_chars])[1:]
            if len(ids) < seq_len:
                raise CalibrationError(f"could not find {seq_len} tokens in {chunk_chars} characters of calibration text")
            rows.append(torch.tensor(ids[:seq_len], dtype=torch.long))
        windows = torch.stack(rows)
    return list(windows.split(batch_size))


def as_batches(calibration: Any, tokenizer: Any, n_samples: int, seq_len: int, seed: int,
               batch_size: int) -> list[torch.Tensor] | None:
    """Calibration given as a text file path, a dataset name (``wikitext2``, ``c4``, ``ptb``), raw text
    (``str`` containing whitespace and no such file), a ``[n, seq_len]`` tensor of token ids, or a sequence
    of such batches."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        if tokenizer is None:
            raise CalibrationError("calibration from text needs the model's tokenizer (tokenizer=...)")
        path = os.fspath(calibration)
        if os.path.isfile(path) or "\n" not in path and len(path) < 4096 and " " not in path:
            text = read_calibration_text(path)
        else:
            text = path
        rank, size = world()
        if size == 1:
            return calibration_batches(tokenizer, text, n_samples, seq_len, seed, batch_size)
        # under accelerate launch each process calibrates on its own n_samples windows: the same windows one
        # process would draw with n_samples * processes, so the reduced statistics equal that run's
        windows = torch.cat(calibration_batches(tokenizer, text, n_samples * size, seq_len, seed, batch_size))
        return list(windows[rank::size].split(batch_size))
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        return list(calibration.split(batch_size))
    batches = list(calibration)
    if not batches:
        raise CalibrationError("calibration data is empty")
    return batches


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


@torch.no_grad()
def layerwise_statistics(
    model: nn.Module,
    adapter: ArchAdapter,
    batches: list[torch.Tensor],
    modules_of: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_layer: Callable[[int, nn.Module, LayerStats], None] | None = None,
    grams_of: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    layer_io: LayerIO | None = None,
    rerun: bool = True,
    dense_targets: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
) -> list[LayerStats]:
    """Input statistics of each layer's projections, gathered one decoder layer at a time.

    Args:
        modules_of: which modules of a layer to hook (default: every module named in the adapter's
            attention and FFN slots).
        device: where each layer runs (defaults to the model's device); the layer is moved back after.
        on_layer: called after a layer's statistics are complete and before its output is computed,
            so sequential methods can modify the layer (its pruned output then feeds the next layer).
        grams_of: modules of a layer whose input Gram matrix ``Σ x xᵀ`` is accumulated into
            ``LayerStats.grams`` (float64 on CPU, float32 on GPU); ``on_layer`` may free them.
        layer_io: hooks around each layer (streaming: load / write / free weights, resume point); the
            returned list then starts at ``layer_io.start``.
        rerun: recompute the layer's output after ``on_layer`` (False when ``on_layer`` only reads it).
        dense_targets: modules of a layer whose inputs are also paired with the *original* model's inputs of
            the same module: a second stream of hidden states runs through an unmodified copy of each layer,
            and ``stats.extra["cross"][module]`` (:class:`~llmprune.calibration.hessian.CrossAccumulator`)
            holds the cross statistics, so ``on_layer`` can refit towards the original outputs
            (``refit_target="dense"``). ``regram`` re-gathers them too. One extra layer copy in memory.
    """
    if not batches:
        raise CalibrationError("no calibration batches")
    if dense_targets is not None and layer_io is not None:
        raise ValueError("dense refit targets are not supported by the streaming path")
    layers = adapter.decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    io = layer_io or LayerIO()
    io.enter(0, layers[0])  # the capture pass runs layer 0's forward once to learn its output type
    captured = capture_layer_inputs(model, adapter, batches)
    hidden = io.initial_hidden(captured.hidden)
    modules_of = modules_of or (lambda layer: _slot_modules(adapter, layer))
    results: list[LayerStats] = []
    dense_hidden = hidden  # the original model's hidden states (dense_targets)
    for i in progress_bar(range(io.start, len(layers)), desc="calibrating layers", disable=not progress,
                          total=len(layers), initial=io.start):
        io.enter(i, layers[i])
        layer = layers[i].to(device)
        stats = LayerStats()
        handles = []
        for module in modules_of(layer):
            s = stats.inputs.setdefault(module, InputStats())
            handles.append(module.register_forward_pre_hook(lambda m, a, s=s: s.update(a[0])))
        for module in (grams_of(layer) if grams_of is not None else ()):
            g = stats.grams.setdefault(module, HessianAccumulator(weight_matrix(module).shape[1], device=device))
            handles.append(module.register_forward_pre_hook(lambda m, a, g=g: g.update(a[0])))
        handles += adapter.calibration_hooks(layer, stats)
        try:
            outs = [run_layer(layer, h, *captured.layer_args[i][b], device) for b, h in enumerate(hidden)]
        finally:
            for h in handles:
                h.remove()
        stats.block_influence = _block_influence(hidden, outs)
        _all_reduce_layer(stats, sum(h.shape[0] * h.shape[1] for h in hidden))
        dense_layer = dense_outs = None
        if dense_targets is not None:
            dense_layer = copy.deepcopy(layer)  # the layer as the original model has it, before on_layer cuts it
            cross = stats.extra.setdefault("cross", {})
            dense_outs = _paired_pass(layer, dense_layer, list(dense_targets(layer)), hidden, dense_hidden,
                                      captured.layer_args[i], device, cross)
        if on_layer is not None:
            def regram(module: nn.Module, layer: nn.Module = layer, i: int = i, stats: LayerStats = stats,
                       dense_layer: nn.Module | None = dense_layer) -> None:
                """Re-gather ``module``'s input Gram and statistics on the layer as it is now (e.g. after its
                attention was cut, for the FFN that reads it), in place of the first ones."""
                g = HessianAccumulator(weight_matrix(module).shape[1], device=device)
                s = InputStats()

                def record(m: nn.Module, a: tuple) -> None:
                    g.update(a[0])
                    s.update(a[0])

                h = module.register_forward_pre_hook(record)
                try:
                    if dense_layer is not None:
                        _paired_pass(layer, dense_layer, [module], hidden, dense_hidden, captured.layer_args[i],
                                     device, stats.extra["cross"])
                    else:
                        for b, hb in enumerate(hidden):
                            run_layer(layer, hb, *captured.layer_args[i][b], device)
                finally:
                    h.remove()
                g.all_reduce()
                s.all_reduce()
                stats.grams[module] = g
                stats.inputs[module] = s

            stats.extra["regram"] = regram
            on_layer(i, layer, stats)
            stats.extra.pop("regram", None)
            if rerun:
                outs = [run_layer(layer, h, *captured.layer_args[i][b], device) for b, h in enumerate(hidden)]
        hidden = [o.to(home) if device != home else o for o in outs]
        if dense_outs is not None:
            dense_hidden = [o.to(home) if device != home else o for o in dense_outs]
        if device != home:
            layers[i].to(home)
        hidden = io.leave(i, layers[i], hidden)
        results.append(stats)
    return results


def _paired_pass(layer: nn.Module, dense_layer: nn.Module, modules: list[nn.Module], hidden: list[torch.Tensor],
                 dense_hidden: list[torch.Tensor], layer_args: list, device: torch.device,
                 cross: dict[nn.Module, CrossAccumulator]) -> list[torch.Tensor]:
    """Run the original layer copy on the original hidden states and ``layer`` on the current ones, batch by
    batch, pairing each of ``modules``' inputs with its counterpart's (same name in the copy) into ``cross``
    (replaced); returns the copy's outputs (the original model's next hidden states)."""
    names = {id(m): n for n, m in layer.named_modules()}
    twins = dict(dense_layer.named_modules())
    stash: dict[str, torch.Tensor] = {}
    handles = []
    for module in modules:
        name = names[id(module)]
        acc = cross[module] = CrossAccumulator(weight_matrix(module).shape[1], device=device)
        handles.append(twins[name].register_forward_pre_hook(lambda m, a, n=name: stash.__setitem__(n, a[0])))
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name, acc=acc: acc.update(a[0], stash.pop(n))))
    outs = []
    try:
        for b, (h, hd) in enumerate(zip(hidden, dense_hidden)):
            outs.append(run_layer(dense_layer, hd, *layer_args[b], device))
            run_layer(layer, h, *layer_args[b], device)
    finally:
        for h in handles:
            h.remove()
    for module in modules:
        cross[module].all_reduce()
    return outs


def _slot_modules(adapter: ArchAdapter, layer: nn.Module) -> list[nn.Module]:
    modules: dict[int, nn.Module] = {}
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    slots = (attn.q_slots + attn.kv_slots if attn else []) + (ffn.slots if ffn else [])
    for slot in slots:
        modules.setdefault(id(slot.module), slot.module)
    return list(modules.values())


def _all_reduce_layer(stats: LayerStats, tokens: int) -> None:
    """Under ``accelerate launch``, make a layer's statistics those of all processes' data together."""
    if world()[1] == 1:
        return
    for s in stats.inputs.values():
        s.all_reduce()
    for g in stats.grams.values():
        g.all_reduce()
    bi, n = all_reduce_sum(torch.tensor([stats.block_influence * tokens], dtype=torch.float64),
                           torch.tensor([float(tokens)], dtype=torch.float64))
    stats.block_influence = float(bi / n)
    for key, value in stats.extra.items():  # adapter statistics are sums over tokens (router mass, tokens)
        if torch.is_tensor(value):
            stats.extra[key] = all_reduce_sum(value)[0]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total = float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64))[0])
            stats.extra[key] = type(value)(total)


def _block_influence(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """ShortGPT Block Influence: mean over tokens of 1 - cos(h_in, h_out)."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        cos = torch.nn.functional.cosine_similarity(x.float().reshape(-1, x.shape[-1]),
                                                    y.float().reshape(-1, y.shape[-1]).to(x.device), dim=-1)
        total += float((1 - cos).sum())
        count += cos.numel()
    return total / max(count, 1)
