"""Efficiency of a (pruned) model: parameters, size on disk, MACs per token, memory, speed.

Speed is measured with random token ids (no text needed): prefill = one forward over
``prompt_len`` tokens, decode = ``new_tokens`` single-token steps with the KV cache, each
after ``warmup`` untimed runs and reported as the median of ``repeats`` timed runs.

Example:
    >>> from llmprune.eval.efficiency import count_parameters, macs_per_token, measure_speed
    >>> count_parameters(model)["total"]                        # doctest: +SKIP
    6819072
    >>> measure_speed(model, 8192, batch_sizes=(1,), repeats=2)  # doctest: +SKIP
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ._checks import model_device, model_vocab_size

__all__ = ["count_parameters", "macs_per_token", "measure_speed", "peak_memory", "size_on_disk"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _role(name: str) -> str:
    lname = name.lower()
    if "lm_head" in lname:
        return "lm_head"
    if "embed" in lname or "wte" in lname or "wpe" in lname:
        return "embedding"
    if "norm" in lname or ".ln" in lname:
        return "norm"
    if any(k in lname for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(k in lname for k in ("mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj")):
        return "mlp"
    return "other"


def count_parameters(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts: ``total`` (shared/tied tensors counted once), ``trainable``,
    ``by_type`` (per module class) and ``by_role`` (embedding, attention, mlp, norm, lm_head, other).

    Example:
        >>> count_parameters(torch.nn.Linear(4, 2))["total"]
        10
    """
    seen: set[int] = set()
    by_type: dict[str, int] = defaultdict(int)
    by_role: dict[str, int] = defaultdict(int)
    total = trainable = 0
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            total += n
            trainable += n if p.requires_grad else 0
            by_type[type(module).__name__] += n
            by_role[_role(f"{mod_name}.{p_name}")] += n
    return {"total": total, "trainable": trainable, "by_type": dict(by_type), "by_role": dict(by_role)}


def size_on_disk(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ...) under ``path``
    (all files if none are weight files); a file path gives its own size.

    Example:
        >>> size_on_disk("../shared/models/ref-llama-7m")  # doctest: +SKIP
        27279728
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Cannot measure size on disk: {path} does not exist.")
    if path.is_file():
        return path.stat().st_size
    files = [f for f in path.rglob("*") if f.is_file()]
    weights = [f for f in files if f.name.endswith(WEIGHT_SUFFIXES)]
    return sum(f.stat().st_size for f in (weights or files))


def macs_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """Multiply-accumulates per token for a causal forward over ``seq_len`` tokens.

    Counts every ``nn.Linear`` (in x out, lm_head included; embedding lookups are free)
    plus attention scores and weighted sums: ``2 * q_dim * (seq_len + 1) / 2`` per
    attention module with a ``q_proj`` (average causal context). Works on pruned models
    with per-layer shapes because it reads the actual modules.

    Example:
        >>> macs_per_token(torch.nn.Linear(4, 2), 16)
        8
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 0.0
    for module in model.modules():
        q = getattr(module, "q_proj", None)
        if isinstance(q, torch.nn.Linear):
            attention += 2 * q.out_features * (seq_len + 1) / 2
    return int(linear + attention)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab(model: torch.nn.Module, tokenizer_or_vocab: Any) -> int:
    if isinstance(tokenizer_or_vocab, int):
        return tokenizer_or_vocab
    if tokenizer_or_vocab is not None:
        return min(len(tokenizer_or_vocab), model_vocab_size(model) or len(tokenizer_or_vocab))
    vocab = model_vocab_size(model)
    if vocab is None:
        raise ValueError("Give a tokenizer or the vocabulary size to measure speed.")
    return vocab


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_speed(
    model: torch.nn.Module,
    tokenizer_or_vocab: Any = None,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_sizes: Iterable[int] = (1, 8),
    warmup: int = 1,
    repeats: int = 3,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill and decode throughput at each batch size (median of ``repeats`` runs).

    Returns ``{"device", "prompt_len", "new_tokens", "warmup", "repeats", "batches":
    {bs: {"prefill_s", "prefill_tokens_per_s", "decode_s", "decode_tokens_per_s",
    "decode_ms_per_step"}}}``; decode tokens/s counts ``bs * new_tokens`` generated tokens.

    Example:
        >>> measure_speed(model, tok, prompt_len=64, new_tokens=8, batch_sizes=(1,))  # doctest: +SKIP
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("prompt_len, new_tokens and repeats must be positive and warmup >= 0.")
    dev = torch.device(device) if device is not None else model_device(model)
    vocab = _vocab(model, tokenizer_or_vocab)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {
        "device": str(dev),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "batches": {},
    }
    try:
        for bs in batch_sizes:
            ids = torch.randint(0, vocab, (bs, prompt_len), generator=gen).to(dev)
            step = torch.randint(0, vocab, (bs, 1), generator=gen).to(dev)

            def prefill() -> Any:
                return model(input_ids=ids, use_cache=True)

            def decode() -> None:
                past = prefill().past_key_values
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    past = model(input_ids=step, past_key_values=past, use_cache=True).past_key_values
                _sync(dev)
                decode.elapsed.append(time.perf_counter() - t0)  # type: ignore[attr-defined]

            prefill_s = _timed(prefill, dev, warmup, repeats)
            decode.elapsed = []  # type: ignore[attr-defined]
            _timed(decode, dev, warmup, repeats)
            decode_s = statistics.median(decode.elapsed[warmup:])  # type: ignore[attr-defined]
            out["batches"][int(bs)] = {
                "prefill_s": prefill_s,
                "prefill_tokens_per_s": bs * prompt_len / prefill_s,
                "decode_s": decode_s,
                "decode_tokens_per_s": bs * new_tokens / decode_s,
                "decode_ms_per_step": 1000 * decode_s / new_tokens,
            }
    finally:
        model.train(was_training)
    return out


def _rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@torch.no_grad()
def peak_memory(
    model: torch.nn.Module,
    tokenizer_or_vocab: Any = None,
    seq_len: int = 256,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Memory of the weights and the peak during one forward of ``batch_size x seq_len``.

    On CUDA ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` for that forward; on CPU
    it is the process' peak resident set size (an upper bound that includes Python and
    everything loaded before), flagged by ``"kind": "process_rss"``.

    Example:
        >>> peak_memory(model, tok, seq_len=128)["weights_bytes"]  # doctest: +SKIP
    """
    dev = torch.device(device) if device is not None else model_device(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    ids = torch.randint(0, _vocab(model, tokenizer_or_vocab), (batch_size, seq_len)).to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize(dev)
        peak, kind = int(torch.cuda.max_memory_allocated(dev)), "cuda_max_allocated"
    else:
        model(input_ids=ids, use_cache=False)
        peak, kind = _rss_peak_bytes(), "process_rss"
    return {"device": str(dev), "weights_bytes": int(weights), "peak_bytes": peak, "kind": kind,
            "seq_len": seq_len, "batch_size": batch_size}
