"""llmprune's eval harness: perplexity, lm-eval task accuracy, efficiency and a report.

Example:
    >>> from llmprune.eval import evaluate, perplexity, load_text, evaluate_tasks
    >>> r = perplexity(model, tok, load_text("wiki.txt"), seq_len=256)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .perplexity import load_text, perplexity  # binds the function over the submodule name

__all__ = ["evaluate", "evaluate_tasks", "load_text", "perplexity"]


def __getattr__(name: str) -> Any:  # lazy: importing eval must not pull in lm_eval/matplotlib
    if name == "evaluate_tasks":
        from .tasks import evaluate_tasks

        return evaluate_tasks
    if name == "evaluate":
        from .api import evaluate

        return evaluate
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
