"""``llmprune support-matrix``: the architecture support matrix as Markdown."""

from __future__ import annotations

import argparse

from ._registry import subcommand

__all__ = ["run"]


@subcommand("support-matrix", "print the architecture support matrix (Markdown)", lambda parser: None)
def run(args: argparse.Namespace) -> int:
    from ..checkpoint.support import support_matrix_markdown

    print(support_matrix_markdown())
    return 0
