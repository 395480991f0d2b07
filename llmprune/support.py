"""The architecture support matrix, generated from the adapter registry (README's table comes from here).

Example::

    print(support_matrix_markdown())
"""

from __future__ import annotations

from .arch import registered_adapters

__all__ = ["support_matrix", "support_matrix_markdown", "UNIT_COLUMNS"]

UNIT_COLUMNS = ("heads", "kv_groups", "neurons", "layers", "experts")


def support_matrix() -> list[dict[str, object]]:
    rows = []
    for adapter in registered_adapters():
        d = adapter.describe()
        rows.append({"family": d["family"], "model_types": d["model_types"],
                     **{u: u in d["units"] for u in UNIT_COLUMNS}})
    return rows


def support_matrix_markdown() -> str:
    header = "| family | model_type | " + " | ".join(UNIT_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (2 + len(UNIT_COLUMNS))]
    for r in support_matrix():
        cells = ["✓" if r[u] else "–" for u in UNIT_COLUMNS]
        lines.append(f"| {r['family']} | {', '.join(r['model_types'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
