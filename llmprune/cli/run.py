"""``llmprune run RECIPE``: run a whole recipe (YAML / JSON, or a saved folder's ``llmprune_recipe.json``).

Example::

    llmprune run recipes/prune-recover.yaml
    llmprune run runs/pruned/llmprune_recipe.json --out runs/pruned-again     # reproduce a saved model
"""

from __future__ import annotations

import argparse

from ._common import is_main_process
from ._registry import subcommand
from .table import format_table, relative_change

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file (.yaml, .yml, .json) or a folder saved by llmprune")
    p.add_argument("--out", default=None,
                   help="output folder (default: the recipe file's 'output'; required for a saved folder's recipe)")
    p.add_argument("--model", default=None,
                   help="the model to run on instead of the recipe's (a saved recipe names a local model by its "
                        "folder name only)")
    p.add_argument("--calib", default=None, help="calibration text instead of the recipe's")
    p.add_argument("--data", default=None, help="training text instead of the recipe's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-verify", action="store_true", help="check saved keys and shapes only (no second copy)")


@subcommand("run", "run a recipe file (prune / sparsify / iterative / recover / evaluate / save)", add_arguments)
def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..training.recipe import is_saved_recipe, read_recipe_file, run_recipe

    if is_saved_recipe(args.recipe) and not args.out:  # a downloaded folder must not choose where we write
        raise ValueError(f"{args.recipe} is a saved model's recipe: give --out (a saved recipe never sets the output)")
    recipe = read_recipe_file(args.recipe)
    overrides = {k: v for k, v in (("model", args.model), ("calibration", args.calib), ("data", args.data)) if v}
    if overrides:
        recipe = dataclasses.replace(recipe, **overrides)
    _check_inputs(recipe, saved=is_saved_recipe(args.recipe))
    summary = run_recipe(recipe, out=args.out, overwrite=args.overwrite, verify=not args.no_verify,
                         progress=not args.quiet)
    if is_main_process():
        rows = [("", "before", "after", "change"),
                ("parameters", f"{summary['params_before']:,}", f"{summary['params_after']:,}",
                 relative_change(summary["params_before"], summary["params_after"]))]
        if summary.get("ppl_before") is not None:
            rows.append(("perplexity", f"{summary['ppl_before']:.2f}", f"{summary['ppl_after']:.2f}",
                         relative_change(summary["ppl_before"], summary["ppl_after"])))
        print(f"\nllmprune: ran {args.recipe} -> {summary['out']}")
        print(format_table(rows))
    return 0


def _check_inputs(recipe, saved: bool) -> None:
    """A saved recipe names a local model and its texts by name only (never an absolute path): say which option
    gives them when they are not found here."""
    from pathlib import Path

    checks = (("model", recipe.model, "--model"), ("calibration", recipe.calibration, "--calib"),
              ("data", recipe.data, "--data"))
    for field, value, flag in checks:
        if not saved or not value or Path(value).exists() or value in ("wikitext2", "c4", "ptb") or "/" in value:
            continue  # a path that exists, a dataset name or a Hub id
        raise ValueError(f"the saved recipe's {field} {value!r} is not found here (saved recipes name local files by "
                         f"name only): pass {flag} PATH")
