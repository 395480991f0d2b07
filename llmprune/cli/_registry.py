"""Registry of ``llmprune`` subcommands (one module per subcommand registers itself)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

__all__ = ["Subcommand", "subcommand", "subcommands"]


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_COMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]
               ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorator on a subcommand's ``run(args) -> exit code``; ``add_arguments`` fills its parser."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in _COMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")

        def add(parser: argparse.ArgumentParser) -> None:
            add_arguments(parser)
            parser.set_defaults(run=run)

        _COMMANDS[name] = Subcommand(name, help, add, run)
        return run

    return wrap


def subcommands() -> list[Subcommand]:
    return list(_COMMANDS.values())
