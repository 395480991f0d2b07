"""Side-by-side report of several evaluated models: table, JSON, Markdown and a PNG plot.

Each model's results are a flat-ish dict (see :func:`llmprune.eval.api.evaluate`); the first model
is the baseline and every other column shows the relative change against it.

Example:
    >>> rep = Report({"dense": {"ppl": 20.0, "params": 100}, "pruned": {"ppl": 25.0, "params": 50}})
    >>> print(rep.to_markdown().splitlines()[3])
    | params | 100 | 50 (-50.0%) |
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "flatten_metrics", "relative_change"]


def relative_change(base: float | None, value: float | None) -> float | None:
    """``(value - base) / base``, or ``None`` if either is missing or base is 0.

    Example:
        >>> relative_change(100, 50)
        -0.5
    """
    if base is None or value is None or base == 0:
        return None
    return (value - base) / abs(base)


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Table rows of one model's results: ``ppl``, ``<task> acc``, ``params``, speed, memory.

    Example:
        >>> flatten_metrics({"perplexity": {"ppl": 3.0}, "params": {"total": 10}})
        {'ppl': 3.0, 'params': 10}
    """
    rows: dict[str, float] = {}
    ppl = result.get("perplexity")
    if isinstance(ppl, dict):
        rows["ppl"] = ppl["ppl"]
        if ppl.get("bits_per_byte") is not None:  # per byte of text: fair across tokenizers (perplexity module)
            rows["bits per byte"] = ppl["bits_per_byte"]
    for task, metrics in (result.get("tasks") or {}).items():
        for key in ("acc", "acc_norm"):
            if metrics.get(key) is not None:
                rows[f"{task} {key}"] = metrics[key]
    params = result.get("params")
    if isinstance(params, dict):
        rows["params"] = params["total"]
    if result.get("size_bytes") is not None:
        rows["size MB"] = result["size_bytes"] / 1e6
    if result.get("macs_per_token") is not None:
        rows["MACs/token"] = result["macs_per_token"]
    speed = result.get("speed") or {}
    for bs, values in (speed.get("batches") or {}).items():
        rows[f"prefill tok/s (bs={bs})"] = values["prefill_tokens_per_s"]
        rows[f"decode tok/s (bs={bs})"] = values["decode_tokens_per_s"]
    memory = result.get("memory")
    if memory:
        rows["weights in memory MB"] = memory["weights_bytes"] / 1e6
        rows[f"peak MB ({memory['kind']})"] = memory["peak_bytes"] / 1e6
    consumed = {"size_bytes", "macs_per_token", "macs_seq_len"}  # shown above under readable names
    for key, value in result.items():  # already-flat numbers (e.g. in tests)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in rows and key not in consumed:
            rows[key] = value
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value)}"
    if abs(value) >= 100:
        return f"{value:.2f}"
    return f"{value:.4g}"


@dataclass
class Report:
    """Results of several models, first one the baseline. ``results[name]`` is one model's dict."""

    results: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[list[str]]:
        """Rows ``[metric, base, other (+x%), ...]`` with a header row first."""
        names = list(self.results)
        flat = {n: flatten_metrics(r) for n, r in self.results.items()}
        metrics: list[str] = []
        for n in names:
            metrics += [m for m in flat[n] if m not in metrics]
        rows = [["metric", *names]]
        for metric in metrics:
            base = flat[names[0]].get(metric)
            row = [metric, _fmt(base)]
            for n in names[1:]:
                value = flat[n].get(metric)
                change = relative_change(base, value)
                row.append(_fmt(value) + (f" ({change:+.1%})" if change is not None else ""))
            rows.append(row)
        return rows

    def to_text(self) -> str:
        """Fixed-width table for the terminal."""
        rows = self.table()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """GitHub Markdown table."""
        rows = self.table()
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"meta", "results", "table"}``."""
        return {"meta": self.meta, "results": self.results, "table": self.table()}

    def plot(self, path: str | Path) -> Path:
        """PNG: PPL and task accuracy against the fraction of parameters kept."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.results)
        flat = {n: flatten_metrics(r) for n, r in self.results.items()}
        base_params = flat[names[0]].get("params")
        xs = [flat[n].get("params", 0) / base_params if base_params else i for i, n in enumerate(names)]
        acc_keys = [k for k in flat[names[0]] if k.endswith(" acc")]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot(xs, [flat[n].get("ppl", float("nan")) for n in names], "o-")
        axes[0].set(title="Perplexity", xlabel="parameters kept", ylabel="PPL")
        for key in acc_keys:
            axes[1].plot(xs, [flat[n].get(key, float("nan")) for n in names], "o-", label=key)
        axes[1].set(title="Task accuracy", xlabel="parameters kept", ylabel="acc")
        if acc_keys:
            axes[1].legend()
        for ax in axes:
            for x, n in zip(xs, names):
                ax.annotate(n, (x, ax.get_ylim()[0]), fontsize=7, rotation=90, va="bottom")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and ``report.png`` into the new folder ``out_dir``, atomically
        (:class:`llmprune.checkpoint.output.atomic_directory`): an existing one is replaced only with
        ``overwrite``."""
        from llmprune.checkpoint.output import atomic_directory

        out = Path(out_dir)
        names = {"json": "report.json", "markdown": "report.md", "png": "report.png"}
        with atomic_directory(out, overwrite=overwrite) as tmp:
            (tmp / names["json"]).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
            (tmp / names["markdown"]).write_text("# llmprune eval report\n\n" + self.to_markdown())
            self.plot(tmp / names["png"])
        return {k: out / v for k, v in names.items()}
