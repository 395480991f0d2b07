"""The before/after table every saving subcommand prints, and the counts it shows."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table", "relative_change", "block_parameters"]


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of strings as aligned columns; the first row is the header (first column left-aligned)."""
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def relative_change(before: float, after: float) -> str:
    """``+12.3%`` style change, empty when ``before`` is 0."""
    return f"{(after - before) / before * 100:+.1f}%" if before else ""


def block_parameters(model: Any) -> int:
    """Parameters inside the decoder blocks (what structured pruning removes)."""
    from ..arch import get_adapter

    return sum(p.numel() for p in get_adapter(model).decoder_layers(model).parameters())
