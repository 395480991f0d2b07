"""What ``llmprune push`` adds to a saved folder's model card: the measured results as ``model-index`` metadata
(the Hub shows them on the model page) and, when GGUF files go up with the model, how to run them in llama.cpp and
Ollama.

Example::

    text = update_card(old_card, "me/llama-pruned", gguf_files=["pruned-Q8_0.gguf"],
                       results=card_results(recipe, tasks={"pruned": {"piqa acc": 0.61}}))
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["card_results", "model_index_yaml", "gguf_section", "update_card", "GGUF_SECTION_TITLE"]

GGUF_SECTION_TITLE = "## Run it in llama.cpp / Ollama"


def _q(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar, whatever it holds


def card_results(recipe: dict[str, Any], tasks: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Results for ``model-index``: perplexity before and after pruning (from the recipe that ``prune --ppl``
    wrote) and task accuracies (``{"pruned": {"piqa acc": 0.61}, "dense": {...}}``, from ``prune --eval``)."""
    out: list[dict[str, Any]] = []
    protocol = recipe.get("ppl_protocol")
    ppl_metrics = []
    if recipe.get("ppl_after") is not None:
        ppl_metrics.append({"type": "perplexity", "value": round(float(recipe["ppl_after"]), 3), "name": "Perplexity"})
    if recipe.get("ppl_before") is not None:
        ppl_metrics.append({"type": "perplexity", "value": round(float(recipe["ppl_before"]), 3),
                            "name": "Perplexity of the model before pruning"})
    if ppl_metrics:
        text = Path(str(protocol).split(",")[0]).name if protocol else "perplexity text"
        out.append({"task": "text-generation", "dataset": text, "protocol": protocol, "metrics": ppl_metrics})
    for name, before_label in (("pruned", None), ("dense", "before pruning")):
        for key, value in sorted(((tasks or {}).get(name) or {}).items()):
            if not key.endswith((" acc", " acc_norm")) or value is None:
                continue
            task, metric = key.rsplit(" ", 1)
            label = f"{task} {metric}" + (f" ({before_label})" if before_label else "")
            out.append({"task": "text-generation", "dataset": task, "protocol": None,
                        "metrics": [{"type": "accuracy" if metric == "acc" else "acc_norm", "value": round(float(value), 4),
                                     "name": label}]})
    return out


def model_index_yaml(name: str, results: list[dict[str, Any]]) -> list[str]:
    """The ``model-index`` front-matter lines (the Hub's schema: task, dataset, metrics with type and value)."""
    if not results:
        return []
    lines = ["model-index:", f"- name: {_q(name)}", "  results:"]
    for r in results:
        lines += ["  - task:", f"      type: {r['task']}", "    dataset:", f"      name: {_q(r['dataset'])}",
                  f"      type: {_q(r['dataset'])}"]
        if r.get("protocol"):
            lines.append(f"      args: {_q(r['protocol'])}")
        lines.append("    metrics:")
        for m in r["metrics"]:
            lines += [f"    - type: {m['type']}", f"      value: {m['value']}", f"      name: {_q(m['name'])}"]
    return lines


def _tag(filename: str) -> str:
    """``pruned-Q8_0.gguf`` -> ``Q8_0``: llama.cpp's ``-hf repo:TAG`` and Ollama's ``hf.co/repo:TAG`` pick the
    file whose name ends with the tag."""
    stem = Path(filename).stem
    return stem.rsplit("-", 1)[-1] if "-" in stem else stem


def gguf_section(repo_id: str, gguf_files: list[str], per_layer: bool = False) -> str:
    """Markdown: commands that run the repository's GGUF files in llama.cpp and Ollama."""
    first = gguf_files[0]
    tag = _tag(first)
    files = ", ".join(f"`{f}`" for f in gguf_files)
    lines = [GGUF_SECTION_TITLE, "",
             f"GGUF files for [llama.cpp](https://github.com/ggml-org/llama.cpp): {files}. Each was loaded in llama.cpp "
             "by llmprune after it was written, and its logits matched transformers' on a test text.", ""]
    if per_layer:
        lines += ["Its layers have different widths, so the files use llama.cpp's `deci` architecture (per-layer "
                  "head counts and FFN widths, added to llama.cpp for Llama-3.1-Nemotron-51B).", ""]
    lines += ["llama.cpp (downloads the file from the Hub):", "", "```sh",
              f"llama-cli -hf {repo_id}:{tag} -p \"The capital of France is\" -n 32",
              f"llama-server -hf {repo_id}:{tag}   # OpenAI-compatible server on http://localhost:8080", "```", "",
              "or with a downloaded file:", "", "```sh", f"llama-cli -m {first} -p \"The capital of France is\" -n 32",
              "```", "", "Ollama:", "", "```sh", f"ollama run hf.co/{repo_id}:{tag}", "```", "",
              "or from a downloaded file:", "", "```sh", f"printf 'FROM ./{first}\\n' > Modelfile",
              f"ollama create {repo_id.split('/')[-1].lower()} -f Modelfile",
              f"ollama run {repo_id.split('/')[-1].lower()}", "```", ""]
    return "\n".join(lines)


def _split_front_matter(text: str) -> tuple[list[str], str]:
    m = re.match(r"---\n(.*?)\n---\n?", text, flags=re.S)
    if not m:
        return [], text
    return m.group(1).splitlines(), text[m.end():]


def update_card(text: str, repo_id: str, gguf_files: list[str] | None = None,
                results: list[dict[str, Any]] | None = None, per_layer: bool = False) -> str:
    """``text`` (a model card) with ``model-index`` results in its front matter (replacing any there) and the
    llama.cpp / Ollama section (replacing an earlier one) when GGUF files are pushed."""
    front, body = _split_front_matter(text)
    kept: list[str] = []
    skipping = False
    for line in front:  # drop an earlier model-index block (top-level key and its indented lines)
        if line.startswith("model-index:"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "-")) or not line.strip()):
            continue
        skipping = False
        kept.append(line)
    kept += model_index_yaml(repo_id.split("/")[-1], results or [])
    if GGUF_SECTION_TITLE in body:
        start = body.index(GGUF_SECTION_TITLE)
        nxt = body.find("\n## ", start + len(GGUF_SECTION_TITLE))
        body = body[:start].rstrip("\n") + ("\n\n" + body[nxt + 1:] if nxt >= 0 else "\n")
    if gguf_files:
        body = body.rstrip("\n") + "\n\n" + gguf_section(repo_id, gguf_files, per_layer)
    return ("---\n" + "\n".join(kept) + "\n---\n" if kept else "") + body
