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
    p.add_argument("--out", default=None, help="output folder (default: the recipe's 'output')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-verify", action="store_true", help="check saved keys and shapes only (no second copy)")


@subcommand("run", "run a recipe file (prune / sparsify / iterative / recover / evaluate / save)", add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..training.recipe import read_recipe_file, run_recipe

    recipe = read_recipe_file(args.recipe)
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
