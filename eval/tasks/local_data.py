"""Loaders for the task files in ``shared/data/tasks`` (used by the YAMLs in this folder).

lm-eval calls each loader through the YAML key ``custom_dataset`` with the task metadata
as keyword arguments; ``data_dir`` (set by :func:`llmprune.eval.tasks.evaluate_tasks`) overrides the
default folder :func:`llmprune.eval.paths.task_data_dir`. Files are read as they are; nothing is
re-ordered, so ``--limit N`` takes the first N documents of each file.

Example:
    >>> load_piqa(data_dir="../shared/data/tasks")["validation"][0]["label"]  # doctest: +SKIP
    0
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import datasets

__all__ = ["load_lambada", "load_openbookqa", "load_piqa", "resolve_data_dir"]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The task data folder: ``data_dir`` if given, else :func:`llmprune.eval.paths.task_data_dir`."""
    if data_dir:
        return Path(data_dir).expanduser()
    from llmprune.eval.paths import task_data_dir

    return task_data_dir()


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"Local task file {path} not found. Set LLMPRUNE_TASK_DATA (or LLMPRUNE_SHARED) to the "
            "folder holding lambada/, piqa/ and openbookqa/, or use the lm-eval task names online."
        )
    return path


def load_lambada(data_dir: str | Path | None = None, **_: Any) -> datasets.DatasetDict:
    """LAMBADA (OpenAI detokenised test set): ``{"test": [{"text": ...}]}``."""
    path = _need(resolve_data_dir(data_dir) / "lambada" / "lambada_test.jsonl")
    with path.open(encoding="utf-8") as fh:
        rows = [{"text": json.loads(line)["text"]} for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_piqa(data_dir: str | Path | None = None, **_: Any) -> datasets.DatasetDict:
    """PIQA validation set with labels from ``valid-labels.lst``: ``goal, sol1, sol2, label``."""
    folder = resolve_data_dir(data_dir) / "piqa"
    with _need(folder / "valid.jsonl").open(encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    with _need(folder / "valid-labels.lst").open(encoding="utf-8") as fh:
        labels = [int(line) for line in fh if line.strip()]
    if len(docs) != len(labels):
        raise ValueError(f"PIQA files disagree: {len(docs)} questions but {len(labels)} labels in {folder}.")
    rows = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


_CHOICE = re.compile(r"\(([A-Z])\)\s*")


def _split_choices(cell: str) -> tuple[list[str], list[str]]:
    parts = _CHOICE.split(cell.strip())  # ['', 'A', 'text', 'B', 'text', ...]
    labels, texts = parts[1::2], [p.strip() for p in parts[2::2]]
    return labels, texts


def load_openbookqa(data_dir: str | Path | None = None, **_: Any) -> datasets.DatasetDict:
    """OpenBookQA main test set from the official TSV, in the HF ``allenai/openbookqa`` layout."""
    path = _need(resolve_data_dir(data_dir) / "openbookqa" / "test.tsv")
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh, delimiter="\t"):
            labels, texts = _split_choices(rec["Choices"])
            rows.append(
                {
                    "id": rec["ID"],
                    "question_stem": rec["Question Stem"],
                    "choices": {"text": texts, "label": labels},
                    "answerKey": rec["Answer Key"].strip(),
                }
            )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
