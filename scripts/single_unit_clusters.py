#!/usr/bin/env python
"""The seed's own measurement for single-unit performance: per layer, the fraction of attention heads and FFN
neurons whose solo label matrix has no cluster (they "contribute nothing" and go first), with the mean cluster
size of the others. Table to stdout and ``OUT/clusters.md``, plot to ``OUT/clusters.png``.

    python scripts/single_unit_clusters.py --out bench/single_unit
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNE_SHARED", REPO.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama-7m"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "reference-train.txt"))
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", default="bench/single_unit")
    args = ap.parse_args()

    import torch

    from llmprune import get_adapter, load_model
    from llmprune.calibration.calibrate import calibration_batches, read_calibration_text
    from llmprune.calibration.single_unit import cluster_analysis, single_unit_statistics

    model, tok = load_model(args.model)
    model.eval()
    adapter = get_adapter(model)
    batches = calibration_batches(tok, read_calibration_text(args.calib), args.n_samples, 256, 0)
    layers = adapter.decoder_layers(model)
    outputs = {i: [next(s.module for s in adapter.attention(layer).q_slots if s.dim == "in"),
                   next(s.module for s in adapter.ffn(layer).slots if s.dim == "in")] for i, layer in enumerate(layers)}
    stats = single_unit_statistics(model, adapter, batches, outputs, top_k=args.top_k)
    rows = []
    for i, layer in enumerate(layers):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        row = {"layer": i}
        for kind, spec, n in (("heads", attn.q_slots, attn.num_heads), ("neurons", ffn.slots, ffn.num_neurons)):
            slot = next(s for s in spec if s.dim == "in")
            s = stats[i].inputs[slot.module]
            idx = slot.indices(torch.arange(n)).reshape(n, slot.width)
            means = s.label_sums / s.label_counts.clamp_min(1).reshape(1, -1)
            M = torch.einsum("nwy,nkw->nyk", means[idx], s.readout[:, idx].permute(1, 0, 2))
            _, _, clustered = cluster_analysis(M)
            row[f"{kind}_no_cluster"] = float((clustered == 0).float().mean())
            row[f"{kind}_mean_cluster_labels"] = float(clustered[clustered > 0].float().mean()) if (clustered > 0).any() else 0.0
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{Path(args.model).name}; {args.n_samples} x 256 calibration tokens; top-{args.top_k} target tokens "
             "as labels; threshold 0.3", "",
             "| layer | heads with no cluster | labels per clustered head | neurons with no cluster | "
             "labels per clustered neuron |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['heads_no_cluster']:.1%} | {r['heads_mean_cluster_labels']:.1f} | "
                     f"{r['neurons_no_cluster']:.1%} | {r['neurons_mean_cluster_labels']:.1f} |")
    (out / "clusters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [r["layer"] for r in rows]
    ax.plot(xs, [r["heads_no_cluster"] for r in rows], "o-", label="attention heads")
    ax.plot(xs, [r["neurons_no_cluster"] for r in rows], "s-", label="FFN neurons")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction with no cluster")
    ax.set_ylim(0, 1)
    ax.set_title("single-unit performance: units that predict no label cluster alone")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "clusters.png", dpi=130)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
