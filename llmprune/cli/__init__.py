"""The ``llmprune`` command. Each subcommand is one module of this package that registers itself with
:func:`subcommand` (its arguments and its ``run``), so adding a command is one new file.

Example::

    llmprune prune ../shared/models/ref-llama-7m --heads 0.25 --ffn 0.25 --method wanda \\
        --calib ../shared/data/reference-train.txt --ppl ../shared/data/wikitext2-raw-test.txt --out runs/pruned
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._common import add_global_arguments, configure_output, init_distributed
from ._registry import Subcommand, subcommand, subcommands

__all__ = ["main", "build_parser", "subcommand", "Subcommand"]

# Importing a module registers its subcommand (hence the "unused" imports); this order is --help's order.
from . import prune as _prune  # noqa: E402,F401
from . import sparsify as _sparsify  # noqa: E402,F401
from . import recover as _recover  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401
from . import evaluate as _evaluate  # noqa: E402,F401
from . import export as _export  # noqa: E402,F401
from . import push as _push  # noqa: E402,F401
from . import support as _support  # noqa: E402,F401


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmprune", description="Prune Hugging Face LLMs and evaluate them.")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in subcommands():
        sub_parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sub_parser)
        add_global_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and return exit code 2."""
    args = build_parser().parse_args(argv)
    configure_output(args)
    init_distributed()
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
