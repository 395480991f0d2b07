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
    p.add_argument("--gguf", action="append", default=[], metavar="FILE",
                   help="also upload this GGUF file beside the safetensors (repeatable; *.gguf files inside the folder, "
                        "from 'prune --export gguf', always go up); the card gets llama.cpp / Ollama commands")


@subcommand("push", "upload a saved model folder (with its model card) to the Hub", add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..checkpoint.hub import push_to_hub

    print(push_to_hub(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                      gguf=args.gguf, task_results=_eval_results(args.folder)))
    return 0


def _eval_results(folder: str) -> dict[str, dict[str, float]] | None:
    """Task accuracies of ``prune --eval`` (its report in ``<folder>-eval/report.json``) for the card's model-index."""
    import json
    from pathlib import Path

    from ..eval.report import flatten_metrics

    report = Path(str(folder).rstrip("/") + "-eval") / "report.json"
    if not report.is_file():
        return None
    results = json.loads(report.read_text()).get("results") or {}
    return {name: flatten_metrics(r) for name, r in results.items() if isinstance(r, dict)}
