"""``llmprune push``: upload a saved model folder (with its model card) to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from ._registry import subcommand

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder written by 'llmprune prune'")
    p.add_argument("repo_id", help="Hub repository, e.g. me/llama-pruned-25")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN)")


@subcommand("push", "upload a saved model folder (with its model card) to the Hub", add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..checkpoint.io import push_to_hub

    print(push_to_hub(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision))
    return 0
