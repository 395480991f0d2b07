"""``llmprune eval``: the eval harness (:mod:`llmprune.eval.cli`) as a subcommand."""

from __future__ import annotations

import argparse

from ._registry import subcommand

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..eval import cli as eval_cli

    eval_cli.add_arguments(parser)


@subcommand("eval", "evaluate models side by side", add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..eval import cli as eval_cli

    return eval_cli.run(args)
