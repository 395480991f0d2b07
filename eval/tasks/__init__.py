"""Zero-shot task accuracy through lm-evaluation-harness, for an in-memory model.

Task names:

* ``lambada``, ``piqa``, ``openbookqa`` are the *local* tasks ``llmprune_lambada``,
  ``llmprune_piqa``, ``llmprune_openbookqa`` (YAMLs shipped in this folder, reading the
  files under :func:`llmprune.eval.paths.task_data_dir`) when those files exist; otherwise they
  fall back to lm-eval's ``lambada_openai``, ``piqa``, ``openbookqa`` (need the Hub).
* ``llmprune_*`` names always mean the local tasks; any other name (``hellaswag``,
  ``arc_easy``...) is passed to lm-eval unchanged.

The YAMLs load their data through ``custom_dataset: !function local_data.load_*``; the
data folder is resolved at run time (``data_dir`` metadata, else ``$LLMPRUNE_TASK_DATA``,
else ``$LLMPRUNE_SHARED/data/tasks``, else ``<repo>/../shared/data/tasks``), so no path is
baked into the YAML files.

Example:
    >>> from llmprune.eval.tasks import evaluate_tasks
    >>> evaluate_tasks(model, tok, ["lambada", "piqa"], limit=50)  # doctest: +SKIP
    {'lambada': {'acc': 0.1, 'acc_norm': None}, 'piqa': {'acc': 0.56, 'acc_norm': 0.54}}
"""

from __future__ import annotations

import difflib
import functools
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .._checks import check_compatible, model_device

__all__ = ["LOCAL_TASKS", "TASKS_DIR", "evaluate_tasks", "make_task_manager", "resolve_task_names"]

#: Folder with the shipped task YAMLs (the ``include_path`` given to lm-eval).
TASKS_DIR = Path(__file__).resolve().parent

#: Short name -> (local task name, file that must exist under the data dir, lm-eval task name).
LOCAL_TASKS: dict[str, tuple[str, str, str]] = {
    "lambada": ("llmprune_lambada", "lambada/lambada_test.jsonl", "lambada_openai"),
    "piqa": ("llmprune_piqa", "piqa/valid.jsonl", "piqa"),
    "openbookqa": ("llmprune_openbookqa", "openbookqa/test.tsv", "openbookqa"),
}


def _data_dir(data_dir: str | Path | None) -> Path:
    from .local_data import resolve_data_dir

    return resolve_data_dir(data_dir)


def make_task_manager(data_dir: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` that also knows the shipped ``llmprune_*`` tasks.

    Example:
        >>> tm = make_task_manager("../shared/data/tasks")  # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model=lm, tasks=["llmprune_piqa"], task_manager=tm)  # doctest: +SKIP
    """
    return _task_manager(str(_data_dir(data_dir)))


@functools.lru_cache(maxsize=4)
def _task_manager(data_dir: str) -> Any:  # indexing lm-eval's task YAMLs takes seconds: do it once
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": data_dir})


def resolve_task_names(tasks: list[str], data_dir: str | Path | None = None, task_manager: Any = None) -> dict[str, str]:
    """Map user task names to lm-eval task names (see the module docstring).

    Raises ``ValueError`` for a name lm-eval does not know, with close matches.

    Example:
        >>> resolve_task_names(["piqa"])  # doctest: +SKIP
        {'piqa': 'llmprune_piqa'}
    """
    if not tasks:
        raise ValueError("No tasks given; e.g. --tasks lambada,piqa.")
    folder = _data_dir(data_dir)
    resolved: dict[str, str] = {}
    for raw in tasks:
        name = raw.strip()
        if not name:
            continue
        if name in LOCAL_TASKS:
            local, needed, remote = LOCAL_TASKS[name]
            resolved[name] = local if (folder / needed).is_file() else remote
        else:
            resolved[name] = name
    if not resolved:
        raise ValueError("No tasks given; e.g. --tasks lambada,piqa.")
    tm = task_manager or make_task_manager(data_dir)
    known = set(tm.all_tasks)
    for user, name in resolved.items():
        if name not in known:
            close = difflib.get_close_matches(name, list(known) + list(LOCAL_TASKS), n=5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"Unknown task {user!r} (lm-eval name {name!r}).{hint} Local tasks: "
                f"{', '.join(LOCAL_TASKS)} (data in {folder}); other names must be lm-eval tasks."
            )
    return resolved


def _metric(values: dict[str, Any], name: str) -> float | None:
    for key, value in values.items():
        if key.split(",")[0] == name and not key.split(",")[0].endswith("_stderr"):
            return float(value) if isinstance(value, (int, float)) else None
    return None


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    resps = sample.get("filtered_resps") or []
    lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
    return {"doc_id": int(sample["doc_id"]), "acc": float(sample.get("acc", float("nan"))), "loglikelihoods": lls}


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int | str = 8,
    device: str | torch.device | None = None,
    data_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    samples: bool = False,
    verbose: bool = False,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of an in-memory model on ``tasks`` via ``lm_eval.simple_evaluate``.

    Returns ``{task: {"acc": ..., "acc_norm": ..., "lm_eval_task": name, ...}}`` where
    ``acc``/``acc_norm`` are lm-eval's own metrics (``acc_norm`` is ``None`` for tasks that
    do not define it, e.g. LAMBADA; LAMBADA also reports ``perplexity``). ``limit`` takes
    the first N documents of each task. ``samples=True`` adds per-document results
    ``[{"doc_id", "acc", "loglikelihoods"}]`` under ``"samples"``. lm-eval's own log warnings and
    Python warnings are hidden unless ``verbose``.

    Example:
        >>> evaluate_tasks(model, tok, ["piqa"], limit=20)["piqa"]["acc"]  # doctest: +SKIP
        0.55
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    check_compatible(model, tokenizer)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents, got {limit}.")
    tm = make_task_manager(data_dir)
    names = resolve_task_names(list(tasks), data_dir, tm)
    dev = str(torch.device(device)) if device is not None else str(model_device(model))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev)
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(dict.fromkeys(names.values())),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                log_samples=samples,
                bootstrap_iters=0,
                verbosity="INFO" if verbose else "ERROR",
            )
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    results = out["results"]
    report: dict[str, dict[str, Any]] = {}
    for user, name in names.items():
        values = results[name]
        entry: dict[str, Any] = {"acc": _metric(values, "acc"), "acc_norm": _metric(values, "acc_norm")}
        ppl = _metric(values, "perplexity")
        if ppl is not None:
            entry["perplexity"] = ppl
        entry["lm_eval_task"] = name
        entry["n_docs"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
        if samples:
            entry["samples"] = [_sample(s) for s in out["samples"][name]]
        report[user] = entry
    return report
