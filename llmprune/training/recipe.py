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

__all__ = ["Recipe", "read_recipe_file", "is_saved_recipe", "run_recipe"]

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
        _check_types(self)
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                _check_section(cls, value, name)
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
        if "model" not in data:
            raise ValueError("a recipe needs 'model' (a folder or Hub id)")
        try:
            return cls(**data)
        except TypeError as exc:  # a value of a type the config's own checks compare or call
            raise ValueError(f"recipe has a value of the wrong type: {exc}") from None

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


def _type_name(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _check_types(recipe: Recipe) -> None:
    """Every top-level field has the type it is declared with, so a wrong one is one line, not a traceback."""
    for name in ("model", "calibration", "data", "teacher", "ppl", "output", "dtype"):
        value = getattr(recipe, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"recipe field {name!r} must be a string, got {_type_name(value)} ({value!r})")
    for name in ("iterative_steps", "recover_between"):
        value = getattr(recipe, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"recipe field {name!r} must be an integer, got {_type_name(value)} ({value!r})")
    for name, cls in _NESTED.items():
        value = getattr(recipe, name)
        if value is not None and not isinstance(value, (dict, cls)):
            raise ValueError(f"recipe section {name!r} must be a mapping of {cls.__name__} fields, got "
                             f"{_type_name(value)} ({value!r})")
    if not isinstance(recipe.extra, dict):
        raise ValueError(f"recipe field 'extra' must be a mapping, got {_type_name(recipe.extra)}")


def _check_section(cls: type, data: dict[str, Any], section: str) -> None:
    """Each value of a ``prune`` / ``sparsify`` / ``recover`` section has its field's type (from the field's
    default): ``heads: "0.25"`` is a string, not an out-of-range ratio."""
    from dataclasses import MISSING

    for f in fields(cls):
        if f.name not in data:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
        value = data[f.name]
        if default is None or value is None:
            continue
        want = type(default)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
              else isinstance(value, int) and not isinstance(value, bool) if want is int
              else isinstance(value, want))
        if not ok:
            raise ValueError(f"recipe field {section}.{f.name} must be {_type_name(default)}, got "
                             f"{_type_name(value)} ({value!r})")


def _parse(p: Path, text: str) -> Any:
    """YAML (``safe_load``: no ``!!python`` objects) or JSON; a syntax error is one line with its place."""
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            if "!!python" in str(exc) or "tag:yaml.org,2002:python" in str(exc):
                problem = "a !!python tag (recipes are plain data; nothing is constructed from them)"
            raise ValueError(f"recipe {p} is not valid YAML{where}: {problem}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"recipe {p} is not valid JSON at line {exc.lineno}: {exc.msg}") from None


def read_recipe_file(path: str | os.PathLike) -> Recipe:
    """A recipe from YAML / JSON, or the ``llmprune_recipe.json`` of a saved folder (or the folder itself).

    A saved folder's recipe never names an output (``output`` is dropped): a downloaded folder must not
    choose where a rerun writes, so ``llmprune run FOLDER`` needs ``--out``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "llmprune_recipe.json"
    if not p.is_file():
        raise FileNotFoundError(f"recipe {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"recipe {p} is not a text file") from None
    data = _parse(p, text)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {p} is not a mapping")
    if "llmprune_recipe_version" in data:
        recipe = Recipe.from_saved(data)
        recipe.output = None
        return recipe
    return Recipe.from_dict(data)


def is_saved_recipe(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a saved model folder or its ``llmprune_recipe.json`` (not a recipe file the user
    wrote)."""
    p = Path(path)
    return p.is_dir() or p.name == "llmprune_recipe.json"


def run_recipe(recipe: Recipe, out: str | os.PathLike | None = None, overwrite: bool = False, verify: bool = True,
               progress: bool = True) -> dict[str, Any]:
    """Run ``recipe`` and save the result (verified, atomic) to ``out`` (default ``recipe.output``).

    Returns ``{"out", "params_before", "params_after", "ppl_before", "ppl_after"}``.
    """
    from ..calibration.calibrate import read_calibration_text
    from ..checkpoint.io import load_model, save_pruned
    from ..checkpoint.output import check_output_path
    from .iterative import prune_iteratively
    from ..structured.pipeline import count_parameters, prune
    from .recover import recover
    from ..sparsity import sparsify

    target = Path(out or recipe.output or "")
    if not str(target) or str(target) == ".":
        raise ValueError("no output folder: give --out or 'output' in the recipe")
    inputs = [recipe.model, recipe.teacher, recipe.calibration, recipe.data, recipe.ppl]
    target = check_output_path(target, sources=inputs, overwrite=overwrite)  # before any work
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
            pruned = prune(model, recipe.prune, tokenizer=tokenizer, calibration=calibration, progress=progress)
            plan, tokenizer = pruned.plan, pruned.tokenizer if pruned.tokenizer is not None else tokenizer
            ppl_of = _ppl_function(recipe.ppl, tokenizer, progress)  # vocab: the rewritten tokenizer from here on
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
