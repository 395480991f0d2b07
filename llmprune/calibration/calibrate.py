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

import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from ..core.stats import InputStats, LayerStats
from ..core.distributed import all_reduce_sum, world
from .engine import (CapturedInputs, LayerIO, LayerStep, capture_layer_inputs, layer_by_layer,  # noqa: F401
                     run_layer)
from .hessian import HessianAccumulator

__all__ = [
    "leading_bos",
    "CalibrationError",
    "InputStats",
    "LayerStats",
    "read_calibration_text",
    "calibration_text",
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


def leading_bos(tokenizer: Any) -> int | None:
    """The id the tokenizer puts before any text it encodes (Llama's and Gemma's ``<bos>``), or ``None`` when it
    adds none (SmolLM2, GPT-2, Qwen). A model trained so sees that token first in every sequence, and some families
    (Gemma) depend on it: their first position is an attention sink. Calibration and perplexity windows start with
    it, as every text the model was trained on did.

    Example::

        leading_bos(AutoTokenizer.from_pretrained("google/gemma-3-270m"))   # 2
    """
    try:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer-like object without the keyword: it adds nothing we can see
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or len(with_special) <= len(plain) or with_special[0] != bos or (plain and plain[0] == bos):
        return None
    return int(bos)


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
    always give the same windows. When the tokenizer starts every text with a BOS token
    (:func:`leading_bos`), each window is that token and ``seq_len - 1`` tokens of text.
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
    bos = leading_bos(tokenizer)
    if bos is not None:  # each window starts as a document does: the same window, its last token making room
        windows = torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows[:, :-1]], dim=1)
    return list(windows.split(batch_size))


def calibration_text(calibration: Any) -> str | None:
    """The text of a calibration given as a text file path, a dataset name or raw text (``str`` containing
    whitespace and no such file); ``None`` for token ids.

    Example::

        calibration_text("calib.txt")[:20]        # the file's first characters
    """
    if not isinstance(calibration, (str, os.PathLike)):
        return None
    path = os.fspath(calibration)
    if os.path.isfile(path) or "\n" not in path and len(path) < 4096 and " " not in path:
        return read_calibration_text(path)
    return path


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
        text = calibration_text(calibration)
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
    """
    if not batches:
        raise CalibrationError("no calibration batches")
    modules_of = modules_of or (lambda layer: _slot_modules(adapter, layer))
    results: list[LayerStats] = []
    for step in layer_by_layer(model, adapter, batches, device=device, layer_io=layer_io, progress=progress,
                               desc="calibrating layers"):
        layer, stats, handles = step.layer, LayerStats(), []
        for module in modules_of(layer):
            s = stats.inputs.setdefault(module, InputStats())
            handles.append(module.register_forward_pre_hook(lambda m, a, s=s: s.update(a[0])))
        for module in (grams_of(layer) if grams_of is not None else ()):
            g = stats.grams.setdefault(module, HessianAccumulator(weight_matrix(module).shape[1], device=step.device))
            handles.append(module.register_forward_pre_hook(lambda m, a, g=g: g.update(a[0])))
        handles += adapter.calibration_hooks(layer, stats)
        try:
            outs = step.forward()
        finally:
            for h in handles:
                h.remove()
        stats.block_influence = _block_influence(step.inputs, outs)
        _all_reduce_layer(stats, sum(h.shape[0] * h.shape[1] for h in step.inputs))
        step.outputs = outs
        if on_layer is not None:
            def regram(module: nn.Module, step: LayerStep = step, stats: LayerStats = stats) -> None:
                """Re-gather ``module``'s input Gram and statistics on the layer as it is now (e.g. after its
                attention was cut, for the FFN that reads it), in place of the first ones."""
                g = HessianAccumulator(weight_matrix(module).shape[1], device=step.device)
                s = InputStats()

                def record(m: nn.Module, a: tuple) -> None:
                    g.update(a[0])
                    s.update(a[0])

                h = module.register_forward_pre_hook(record)
                try:
                    step.forward()
                finally:
                    h.remove()
                g.all_reduce()
                s.all_reduce()
                stats.grams[module] = g
                stats.inputs[module] = s

            stats.extra["regram"] = regram
            on_layer(step.index, layer, stats)
            stats.extra.pop("regram", None)
            if rerun:
                step.outputs = step.forward()
        results.append(stats)
    return results


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
