"""Recipes: one YAML or JSON file describes a whole run (model, pruning, sparsity, calibration, iterative
steps, recovery, evaluation, output), and ``llmprune run RECIPE`` reproduces it.

Every folder llmprune saves carries its recipe in ``llmprune_recipe.json`` (key ``run``), so
``llmprune run runs/pruned/llmprune_recipe.json --out runs/again`` rebuilds the same model; recipes written by
older versions (``config`` + ``source_model`` only) are read too.

Example (YAML)::

    model: ../shared/models/ref-llama-7m
    calibration: ../shared/data/reference-train.txt
    prune: {heads: 0.5, ffn: 0.5, method: wanda, reconstruct: true}
    iterative_steps: 2          # optional: prune in 2 steps ...
    recover_between: 100        # ... with 100 recovery steps after the first
    recover: {steps: 300}       # final recovery (RecoveryConfig fields)
    data: ../shared/data/reference-train.txt
    teacher: source             # distil from the unpruned model (or a path / Hub id)
    ppl: ../shared/data/wikitext2-raw-test.txt
    output: runs/pruned-recovered
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.config import PruneConfig
from .recover import RecoveryConfig
from ..sparsity import SparsityConfig

__all__ = ["Recipe", "read_recipe_file", "run_recipe"]

_NESTED = {"prune": PruneConfig, "sparsify": SparsityConfig, "recover": RecoveryConfig}


@dataclass
class Recipe:
    """A whole run. ``teacher: source`` distils from ``model`` itself (the unpruned weights)."""

    model: str
    prune: PruneConfig | None = None
    sparsify: SparsityConfig | None = None
    calibration: str | None = None
    iterative_steps: int = 1
    recover_between: int = 0
    recover: RecoveryConfig | None = None
    data: str | None = None
    teacher: str | None = None
    ppl: str | None = None
    output: str | None = None
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("a recipe needs 'model' (a folder or Hub id)")
        if self.prune is None and self.sparsify is None and self.recover is None:
            raise ValueError("a recipe needs at least one of 'prune', 'sparsify' or 'recover'")
        if self.iterative_steps < 1 or self.recover_between < 0:
            raise ValueError("iterative_steps must be >= 1 and recover_between >= 0")
        if self.iterative_steps > 1 and self.prune is None:
            raise ValueError("iterative_steps needs a 'prune' section")
        if (self.recover is not None or self.recover_between) and not self.data:
            raise ValueError("recovery needs 'data' (a text file or dataset name)")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "Recipe":
        """The run behind a saved ``llmprune_recipe.json`` (its ``run`` entry, or rebuilt from older keys)."""
        if isinstance(saved.get("run"), dict):
            return cls.from_dict(saved["run"])
        if isinstance(saved.get("one_cycle"), dict):
            raise ValueError("this model was made by 'llmprune train' (one-cycle); recipes do not describe one-cycle "
                             "runs yet: rerun llmprune train with the settings under 'one_cycle' and 'recovery'")
        if isinstance(saved.get("recovery"), dict):
            return cls(model=saved.get("recovered_from") or saved.get("source_model"), recover=saved["recovery"], data=saved.get("training_data"),
                       teacher=saved.get("teacher"))
        if isinstance(saved.get("sparsity_config"), dict):
            return cls(model=saved["source_model"], sparsify=saved["sparsity_config"],
                       calibration=saved.get("calibration"))
        if isinstance(saved.get("config"), dict) and saved.get("source_model"):
            return cls(model=saved["source_model"], prune=saved["config"], calibration=saved.get("calibration"))
        raise ValueError("this llmprune_recipe.json does not say how the model was made (no run, config or source)")


def read_recipe_file(path: str | os.PathLike) -> Recipe:
    """A recipe from YAML / JSON, or the ``llmprune_recipe.json`` of a saved folder (or the folder itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "llmprune_recipe.json"
    if not p.is_file():
        raise FileNotFoundError(f"recipe {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {p} is not a mapping")
    if "llmprune_recipe_version" in data:
        return Recipe.from_saved(data)
    return Recipe.from_dict(data)


def run_recipe(recipe: Recipe, out: str | os.PathLike | None = None, overwrite: bool = False, verify: bool = True,
               progress: bool = True) -> dict[str, Any]:
    """Run ``recipe`` and save the result (verified, atomic) to ``out`` (default ``recipe.output``).

    Returns ``{"out", "params_before", "params_after", "ppl_before", "ppl_after"}``.
    """
    from ..calibration.calibrate import read_calibration_text
    from ..checkpoint.io import OutputExistsError, load_model, save_pruned
    from .iterative import prune_iteratively
    from ..structured.pipeline import count_parameters, prune
    from .recover import recover
    from ..sparsity import sparsify

    target = Path(out or recipe.output or "")
    if not str(target) or str(target) == ".":
        raise ValueError("no output folder: give --out or 'output' in the recipe")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output directory {target} already exists; pass --overwrite to replace it")
    calibration = read_calibration_text(recipe.calibration) if recipe.calibration else None
    data = read_calibration_text(recipe.data) if recipe.data else None
    model, tokenizer = load_model(recipe.model, dtype=recipe.dtype)
    if recipe.prune is not None:  # attention_unit "auto" resolved once, so the saved recipe names the unit
        import dataclasses

        from ..arch import get_adapter
        from ..structured.select import resolve_config

        recipe = dataclasses.replace(recipe, prune=resolve_config(model, get_adapter(model), recipe.prune))
    teacher = None
    if recipe.teacher:
        teacher = load_model(recipe.model if recipe.teacher == "source" else recipe.teacher, dtype=recipe.dtype,
                             with_tokenizer=False)[0]
    ppl_of = _ppl_function(recipe.ppl, tokenizer, progress)
    summary: dict[str, Any] = {"params_before": count_parameters(model), "ppl_before": ppl_of(model)}
    plan = None
    if recipe.prune is not None:
        if recipe.iterative_steps > 1:
            between = RecoveryConfig(**{**(recipe.recover.to_dict() if recipe.recover else {}),
                                        "steps": recipe.recover_between}) if recipe.recover_between else None
            model = prune_iteratively(model, recipe.prune, recipe.iterative_steps, recovery=between, data=data,
                                      tokenizer=tokenizer, calibration=calibration, teacher=teacher,
                                      progress=progress).model
        else:
            plan = prune(model, recipe.prune, tokenizer=tokenizer, calibration=calibration, progress=progress).plan
    if recipe.sparsify is not None:
        sparsify(model, recipe.sparsify, tokenizer=tokenizer, calibration=calibration, progress=progress)
    history = None
    if recipe.recover is not None:
        result = recover(model, recipe.recover, data=data, tokenizer=tokenizer, teacher=teacher, progress=progress)
        model, history = result.model, result.history
    summary.update(params_after=count_parameters(model), ppl_after=ppl_of(model))
    extra = {"run": recipe.to_dict(), "params_before": summary["params_before"],
             "params_after": summary["params_after"], "calibration": recipe.calibration}
    if recipe.sparsify is not None:
        extra["sparsity_config"] = recipe.sparsify.to_dict()
    if recipe.recover is not None:
        extra.update(recovery=recipe.recover.to_dict(), recovery_history=history, training_data=recipe.data,
                     teacher=recipe.teacher)
    if recipe.ppl:
        extra.update(ppl_before=summary["ppl_before"], ppl_after=summary["ppl_after"])
    save_pruned(model, target, tokenizer=tokenizer, config=recipe.prune, plan=plan, source=recipe.model,
                overwrite=overwrite, verify=verify, extra=extra)
    summary["out"] = str(target)
    summary["model"] = model
    return summary


def _ppl_function(source: str | None, tokenizer: Any, progress: bool):
    if not source:
        return lambda model: None
    from ..eval.perplexity import load_text, perplexity

    text = load_text(source)
    return lambda model: perplexity(model, tokenizer, text, seq_len=256, max_tokens=60000, progress=progress).ppl
