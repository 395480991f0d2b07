"""The architecture support matrix, generated from the adapter registry (README's table comes from here).

Example::

    print(support_matrix_markdown())
"""

from __future__ import annotations

from ..arch import registered_adapters
from .gguf_export import SUPPORTED_MODEL_TYPES as GGUF_MODEL_TYPES

__all__ = ["support_matrix", "support_matrix_markdown", "UNIT_COLUMNS", "MARKER_START", "MARKER_END",
           "replace_readme_block"]

#: README.md holds the generated table between these markers (scripts/update_support_matrix.py)
MARKER_START = "<!-- support-matrix:start -->"
MARKER_END = "<!-- support-matrix:end -->"

UNIT_COLUMNS = ("heads", "kv_groups", "neurons", "layers", "experts", "hidden")


#: what per-layer (``--allocation global``) outputs need, for every family: llmprune's registered classes
PER_LAYER_LOADING = "after `import llmprune`"


def support_matrix() -> list[dict[str, object]]:
    """One row per family and loading behaviour: prunable units, and which outputs plain transformers loads
    (``uniform``: :attr:`ArchAdapter.standard_outputs`; ``per_layer``: always through llmprune's classes)."""
    rows = []
    for adapter in registered_adapters():
        d = adapter.describe()
        groups: dict[str, list[str]] = {}
        for model_type, loads in d["standard_outputs"].items():
            groups.setdefault(loads, []).append(model_type)
        for loads, model_types in groups.items():
            rows.append({"family": d["family"], "model_types": model_types,
                         **{u: u in d["units"] for u in UNIT_COLUMNS},
                         "uniform": loads, "per_layer": PER_LAYER_LOADING,
                         "gguf": [t for t in model_types if t in GGUF_MODEL_TYPES]})
    return rows


def support_matrix_markdown() -> str:
    header = ("| family | model_type | " + " | ".join(UNIT_COLUMNS)
              + " | loads without llmprune: uniform | per-layer | llama.cpp / Ollama (`export --format gguf`) |")
    lines = [header, "|" + "---|" * (5 + len(UNIT_COLUMNS))]
    for r in support_matrix():
        cells = ["✓" if r[u] else "–" for u in UNIT_COLUMNS]
        lines.append(f"| {r['family']} | {', '.join(r['model_types'])} | " + " | ".join(cells)
                     + f" | {r['uniform']} | no: loads {r['per_layer']} | "
                     + (f"{', '.join(r['gguf'])}: uniform and per-layer" if r["gguf"] else "–") + " |")
    return "\n".join(lines)


def replace_readme_block(text: str, table: str | None = None) -> str | None:
    """``text`` with the block between the support-matrix markers replaced by the generated table
    (``None`` if the markers are absent)."""
    start, end = text.find(MARKER_START), text.find(MARKER_END)
    if start < 0 or end < start:
        return None
    table = support_matrix_markdown() if table is None else table
    return text[: start + len(MARKER_START)] + "\n" + table + "\n" + text[end:]
