"""The before/after table every saving subcommand prints, and the counts it shows."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table", "relative_change", "block_parameters", "unit_fraction_rows", "width_rows", "budget_rows",
           "budget_notes", "before_after_rows"]


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


def unit_fraction_rows(config: Any, widths_before: list[dict[str, int]], widths_after: list[dict[str, int]],
                       plan: Any) -> list[tuple[str, ...]]:
    """Requested vs achieved fraction removed per unit kind (heads, KV heads, neurons, experts, layers).

    Fractions are over the layers that remain (``--layers`` is reported on its own row), so rounding to
    whole units (``--rounding``) and ``--multiple-of`` show up as a gap between the two columns.
    """
    kept = [widths_before[i] for i in plan.kept_layers] if plan is not None else widths_before
    kinds = [("attention heads", "heads", config.heads), ("KV heads", "kv_heads", None),
             ("FFN neurons", "neurons", config.ffn), ("experts", "experts", config.experts),
             ("expert neurons", "expert_neurons", config.ffn)]
    rows: list[tuple[str, ...]] = [("removed", "requested", "achieved", "kept / original")]
    for label, key, requested in kinds:
        total = sum(w.get(key, 0) for w in kept)
        if not total:
            continue
        left = sum(w.get(key, 0) for w in widths_after)
        rows.append((label, "-" if requested is None else f"{requested:.3f}", f"{1 - left / total:.3f}",
                     f"{left:,} / {total:,}"))
    n_layers = len(widths_before)
    removed = n_layers - len(kept)
    rows.append(("decoder layers", f"{config.layers}", f"{removed}", f"{n_layers - removed} / {n_layers}"))
    return rows


def width_rows(requested: Any, done: Any, hidden_before: int, hidden_after: int, params_before: int,
               params_after: int, vocab_before: int = 0, vocab_after: int = 0) -> list[tuple[str, ...]]:
    """Rows for the hidden channels (when pruned), the vocabulary (``--vocab``) and all parameters (``--params``)
    under the unit table's header: ``requested`` is what the user asked, ``done`` the resolved config (``--params``
    chose ``hidden``)."""
    rows: list[tuple[str, ...]] = []
    if (getattr(requested, "vocab", 0) or getattr(done, "vocab", 0)) and vocab_before:
        asked = f"{requested.vocab:.3f}" if requested.vocab else f"({done.vocab:.3f})"  # (chosen by --params)
        rows.append(("vocabulary rows", asked, f"{1 - vocab_after / vocab_before:.3f}",
                     f"{vocab_after:,} / {vocab_before:,}"))
    if done.hidden or hidden_after != hidden_before:
        asked = f"{requested.hidden:.3f}" if requested.hidden else f"({done.hidden:.3f})"
        rows.append(("hidden channels", asked, f"{1 - hidden_after / hidden_before:.3f}",
                     f"{hidden_after:,} / {hidden_before:,}"))
    if requested.params:
        rows.append(("all parameters", f"{requested.params:.3f}", f"{1 - params_after / params_before:.3f}",
                     f"{params_after:,} / {params_before:,}"))
    return rows


def budget_rows(budget: dict[str, Any]) -> list[tuple[str, ...]]:
    """The ``--params`` candidates: each split's shares of the target (vocabulary / hidden / blocks), its ratios, the
    parameters its stand-in prune removed and its held-out loss."""
    proxy = f"{budget.get('proxy')}{' + refit' if budget.get('proxy_refits') else ''}"
    unit = "loss/byte" if budget.get("loss_unit", "").endswith("text") else "loss/token"
    rows: list[tuple[str, ...]] = [(f"--params shares v/h/b (stand-in: {proxy})", "vocab", "hidden", "heads", "ffn",
                                    "params removed", unit)]
    for i, c in enumerate(budget["candidates"]):
        mark = " <- chosen" if i == budget["chosen"] else ""
        shares = f"{c.get('vocab_share', 0):.2f}/{c['hidden_share']:.2f}/{c.get('blocks_share', 1 - c['hidden_share']):.2f}"
        rows.append((shares + mark, f"{c.get('vocab', 0):.3f}", f"{c['hidden']:.3f}", f"{c['heads']:.3f}",
                     f"{c['ffn']:.3f}", f"{c['removed']:.3f}", f"{c['loss']:.4f}"))
    return rows


def budget_notes(budget: dict[str, Any]) -> list[str]:
    """The ``--params`` splits skipped (and why) and the axes not measured, one line each."""
    lines = [f"  skipped {c['vocab_share']:.2f}/{c['hidden_share']:.2f}/{c['blocks_share']:.2f}: {c['why']}"
             for c in budget.get("skipped", [])]
    return lines + [f"  {note}" for note in budget.get("notes", [])]


def before_after_rows(before: dict[str, Any], after: dict[str, Any], ppl_label: str | None = None
                      ) -> list[tuple[str, ...]]:
    """The before/after table: parameters, decoder-block parameters, size on disk, perplexity and bits per byte
    (when given)."""
    rows = [("", "before", "after", "change"),
            ("parameters", f"{before['params']:,}", f"{after['params']:,}", relative_change(before["params"], after["params"])),
            ("decoder-block parameters", f"{before['block']:,}", f"{after['block']:,}",
             relative_change(before["block"], after["block"]))]
    for key, label in (("nonzero", "nonzero parameters"), ("sparsity", "weight sparsity (targets)")):
        if key in before:
            fmt = (lambda v: f"{v:,}") if key == "nonzero" else (lambda v: f"{v:.3f}")
            rows.append((label, fmt(before[key]), fmt(after[key]),
                         relative_change(before[key], after[key]) if key == "nonzero" else ""))
    if before.get("size") is not None and after.get("size") is not None:
        rows.append(("size on disk (MB)", f"{before['size'] / 1e6:.2f}", f"{after['size'] / 1e6:.2f}",
                     relative_change(before["size"], after["size"])))
    if ppl_label and before.get("ppl") is not None:
        rows.append((ppl_label, f"{before['ppl']:.2f}", f"{after['ppl']:.2f}", relative_change(before["ppl"], after["ppl"])))
    if ppl_label and before.get("bpb") is not None and after.get("bpb") is not None:
        # per byte of text: comparable when the tokenizer changed (--vocab), where per-token perplexity is not
        rows.append(("bits per byte (same text)", f"{before['bpb']:.4f}", f"{after['bpb']:.4f}",
                     relative_change(before["bpb"], after["bpb"])))
    for label, value in after.get("extra_rows", []):
        rows.append((label, "", value, ""))
    return rows
