"""Pushing a saved folder to the Hugging Face Hub: validated first, GGUF files beside the safetensors, the model
card completed (:mod:`.hub_card`), one commit, and a Hub refusal as one line that says what to do.

Example::

    push_to_hub("runs/pruned", "me/llama-pruned-25", gguf=["runs/pruned-Q8_0.gguf"])
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError
from .gguf_load import check_gguf
from .hub_card import card_results, update_card
from .io import RECIPE_FILE, _check_local_checkpoint

__all__ = ["push_to_hub"]


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None,
                gguf: list[str | os.PathLike] | None = None,
                task_results: dict[str, dict[str, float]] | None = None) -> str:
    """Upload a saved (pruned or sparsified) model folder to the Hugging Face Hub; returns the commit URL.

    The folder's ``README.md`` (written by :func:`save_pruned`) is the model card; the uploaded copy also carries
    the run's results as ``model-index`` metadata (perplexity before/after from the recipe, ``task_results`` from
    ``prune --eval``) and, when GGUF files go up (``*.gguf`` in the folder, from ``prune --export gguf``, and the
    files in ``gguf``), the commands that run them in llama.cpp and Ollama. The folder is validated first (config
    and safetensors weights, GGUF magic), so a broken save is never pushed. One commit.

    Example::

        push_to_hub("runs/pruned", "me/llama-pruned-25", gguf=["runs/pruned-Q8_0.gguf"])
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    _check_local_checkpoint(path)
    files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}
    for extra in gguf or []:
        e = Path(extra)
        if not e.is_file():
            raise CheckpointError(f"GGUF file {e} does not exist")
        if e.name in files and files[e.name].resolve() != e.resolve():
            raise CheckpointError(f"{path} already holds a file named {e.name}")
        files[e.name] = e
    ggufs = sorted(n for n in files if n.endswith(".gguf") and "/" not in n)
    for name in ggufs:
        check_gguf(files[name])
    recipe = {}
    if (path / RECIPE_FILE).is_file():
        recipe = json.loads((path / RECIPE_FILE).read_text())
    card = (path / "README.md").read_text() if (path / "README.md").is_file() else ""
    per_layer = str(json.loads((path / "config.json").read_text()).get("model_type", "")).startswith("llmprune_")
    card = update_card(card, repo_id, gguf_files=ggufs, results=card_results(recipe, task_results), per_layer=per_layer)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in files.items()
           if name != "README.md"]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id=repo_id, operations=ops, repo_type="model", revision=revision,
                                 commit_message=commit_message or "Upload model pruned with llmprune")
    except HfHubHTTPError as exc:  # several lines of request ids and server text: one line that says what to do
        raise CheckpointError(_hub_refusal(repo_id, exc)) from None
    return str(getattr(info, "commit_url", info))


def _hub_refusal(repo_id: str, exc: Exception) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    hints = {401: "the token is missing or invalid: log in (hf auth login) or pass --token / set HF_TOKEN",
             403: "the token may not write there: use a token with write access to that namespace",
             404: "no such repository or namespace"}
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return f"push to {repo_id} refused by the Hub ({status or 'error'}): {hints.get(status, first)}"
