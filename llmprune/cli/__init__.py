"""The ``llmprune`` command. Each subcommand is one module of this package that registers itself with
:func:`subcommand` (its arguments and its ``run``), so adding a command is one new file.

Example::

    llmprune prune ../shared/models/ref-llama-7m --heads 0.25 --ffn 0.25 --method wanda \\
        --calib ../shared/data/reference-train.txt --ppl ../shared/data/wikitext2-raw-test.txt --out runs/pruned
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
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
from . import analyze as _analyze  # noqa: E402,F401
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


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised where the process is, so ``finally`` blocks and :class:`atomic_directory` remove
    what the run was writing (a BaseException, like KeyboardInterrupt: ``except Exception`` does not eat it)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def _catch_termination() -> dict[int, object]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` (main thread only); returns the previous handlers."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, _raise_terminated)
    return previous


def _resumable(args: argparse.Namespace) -> str:
    """Where an interrupted run's resumable state was kept on purpose (a streamed run's ``.OUT.partial``,
    ``recover``'s ``OUT.recover-state``), said with the stop message."""
    from pathlib import Path

    out = getattr(args, "out", None)
    if not out:
        return ""
    for state in (Path(out).with_name(f".{Path(out).name}.partial"), Path(str(out) + ".recover-state")):
        if state.is_dir():
            return f"; the finished part is kept in {state}: continue with --resume (or remove it)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and return exit code 2. Ctrl-C, SIGTERM and SIGHUP stop
    it cleanly (130 / 143 / 129): temporary folders removed, nothing of the user's replaced."""
    args = build_parser().parse_args(argv)
    configure_output(args)
    init_distributed()
    previous = _catch_termination()
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"llmprune: error: {message}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        name = str(exc) if isinstance(exc, Terminated) else "SIGINT"
        print(f"llmprune: stopped by {name}; temporary files removed{_resumable(args)}", file=sys.stderr)
        return 128 + int(getattr(signal, name, signal.SIGINT))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
