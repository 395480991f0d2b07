"""One call that evaluates several models side by side (used by ``llmprune eval`` and
``llmprune prune --eval``).

Example:
    >>> from llmprune.eval.api import evaluate
    >>> rep = evaluate({"dense": (model, tok, "ref-llama-7m"), "pruned": (pm, tok, None)},
    ...                ppl="wiki.txt", seq_len=256, max_tokens=60_000, tasks=["piqa"],
    ...                limit=100, out_dir="runs/eval")  # doctest: +SKIP
    >>> print(rep.to_text())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .efficiency import count_parameters, macs_per_token, measure_speed, peak_memory, size_on_disk
from .perplexity import default_seq_len, load_text, perplexity
from .report import Report

__all__ = ["evaluate"]

log = logging.getLogger(__name__)


def evaluate(
    models: dict[str, tuple[torch.nn.Module, Any, str | Path | None]],
    ppl: str | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    speed: bool = True,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 1,
    repeats: int = 3,
    drop_last: bool = True,
    progress: bool = True,
    verbose: bool = False,
    overwrite: bool = False,
) -> Report:
    """Evaluate each ``name -> (model, tokenizer, saved_dir_or_None)``; the first is the baseline.

    Per model: perplexity on ``ppl`` (file or alias), lm-eval ``tasks`` with ``limit``,
    parameter counts, size on disk (when a directory is given), MACs/token, and with
    ``speed`` the prefill/decode throughput and peak memory. Writes JSON/Markdown/PNG into
    ``out_dir`` when given (a new folder; an existing one is replaced only with ``overwrite``). Models stay on
    their device unless ``device`` is given. ``progress=False`` hides
    progress bars; ``verbose=True`` shows lm-eval's own warnings.
    """
    if not models:
        raise ValueError("No models to evaluate.")
    if out_dir is not None:  # before any work: an existing report is never replaced silently
        from llmprune.checkpoint.output import check_output_path

        check_output_path(out_dir, sources=[str(p) for _, _, p in models.values() if p] + [ppl], overwrite=overwrite)
    text = load_text(ppl) if ppl else None
    results: dict[str, dict[str, Any]] = {}
    for name, (model, tokenizer, path) in models.items():
        if device is not None:
            model.to(device)
        res: dict[str, Any] = {"path": str(path) if path else None}
        if text is not None:
            log.info("%s: perplexity", name)
            res["perplexity"] = perplexity(
                model, tokenizer, text, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                batch_size=batch_size, progress=progress, drop_last=drop_last,
            ).to_dict()
        if tasks:
            from .tasks import evaluate_tasks

            log.info("%s: tasks %s", name, ",".join(tasks))
            res["tasks"] = evaluate_tasks(model, tokenizer, list(tasks), limit=limit, batch_size=batch_size,
                                          verbose=verbose)
        res["params"] = count_parameters(model)
        if path and Path(path).exists():
            res["size_bytes"] = size_on_disk(path)
        # MACs at the evaluated window length, else at the same default window perplexity would use
        macs_len = seq_len or (res.get("perplexity") or {}).get("seq_len") or default_seq_len(model)
        res["macs_per_token"] = macs_per_token(model, macs_len)
        res["macs_seq_len"] = macs_len
        if speed:
            log.info("%s: speed", name)
            res["speed"] = measure_speed(model, tokenizer, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats)
            res["memory"] = peak_memory(model, tokenizer, seq_len=min(macs_len, 512))
        results[name] = res
    meta = {"ppl_source": ppl, "seq_len": seq_len, "max_tokens": max_tokens, "stride": stride,
            "tasks": list(tasks or []), "limit": limit, "drop_last": drop_last}
    report = Report(results, meta)
    if out_dir is not None:
        report.save(out_dir, overwrite=overwrite)
    return report
