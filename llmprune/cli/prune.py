"""``llmprune prune``: structured pruning of a model folder or Hub id, saved with a before/after table.

Example::

    llmprune prune ../shared/models/ref-llama-7m --heads 0.25 --ffn 0.25 --method wanda \\
        --calib ../shared/data/reference-train.txt --ppl ../shared/data/wikitext2-raw-test.txt --out runs/pruned
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._registry import subcommand
from .table import block_parameters, format_table, relative_change

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model folder or Hugging Face Hub id")
    p.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads removed (default 0)")
    p.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN neurons removed (default 0)")
    p.add_argument("--layers", type=int, default=0, help="number of whole decoder blocks removed (Block Influence)")
    p.add_argument("--experts", type=float, default=0.0,
                   help="fraction of experts removed from every mixture-of-experts layer (routing mass with --calib, "
                        "else weight norm); --ffn then prunes neurons inside each expert")
    p.add_argument("--method", default="wanda", help="importance criterion: magnitude, magnitude_l1, wanda (activation-aware), flap (fluctuation)")
    p.add_argument("--allocation", choices=("uniform", "global"), default="uniform")
    p.add_argument("--attention-unit", choices=("group", "query"), default="group",
                   help="group: remove whole KV groups; query: remove query heads evenly from every KV group")
    p.add_argument("--rounding", choices=("error", "down", "up", "nearest"), default="error",
                   help="what to do when --heads does not give whole units (default: error)")
    p.add_argument("--multiple-of", type=int, default=1, help="round kept FFN widths to a multiple of this")
    p.add_argument("--min-keep", type=float, default=0.1, help="global allocation: smallest fraction kept per layer")
    p.add_argument("--bias-compensation", action="store_true",
                   help="add removed units' mean output to the o_proj/down_proj bias (FLAP)")
    p.add_argument("--calib", help="calibration text file (needed by wanda and --layers)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--ppl", help="text file (or dataset alias when online) for before/after perplexity")
    p.add_argument("--ppl-seq-len", type=int, default=256, help="perplexity window length (default 256)")
    p.add_argument("--ppl-max-tokens", type=int, default=60000, help="perplexity on the first N tokens (default 60000)")
    p.add_argument("--ppl-keep-tail", action="store_true",
                   help="also score the last partial window (all --ppl-max-tokens tokens are predicted)")
    p.add_argument("--device", default=None, help="device for calibration and evaluation (default: cpu or cuda if available)")
    p.add_argument("--dtype", default=None, help="load dtype (float32, bfloat16, float16)")
    p.add_argument("--eval", action="store_true", help="run the eval harness on the original and pruned model at the end")
    p.add_argument("--eval-tasks", default="", help="tasks for --eval, e.g. lambada,piqa")
    p.add_argument("--eval-limit", type=int, default=None, help="documents per task for --eval")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@subcommand("prune", "prune a model and save it", add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch
    from ..eval.efficiency import size_on_disk

    from ..pipeline import count_parameters, prune
    from ..config import PruneConfig
    from ..io import OutputExistsError, load_model, save_pruned

    cfg = PruneConfig(heads=args.heads, ffn=args.ffn, layers=args.layers, experts=args.experts, method=args.method,
                      allocation=args.allocation, attention_unit=args.attention_unit, rounding=args.rounding,
                      multiple_of=args.multiple_of, bias_compensation=args.bias_compensation, min_keep=args.min_keep, n_samples=args.n_samples,
                      seq_len=args.seq_len, seed=args.seed)
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # fail before any work
        raise OutputExistsError(f"output directory {out} already exists; pass --overwrite to replace it")
    if args.calib and not Path(args.calib).is_file():
        from ..calibrate import CalibrationError

        raise CalibrationError(f"calibration file {args.calib!r} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    progress = not args.quiet
    text = None
    if args.ppl:
        from ..eval.perplexity import load_text, perplexity

        text = load_text(args.ppl)

    def ppl_of(m: Any) -> float | None:
        if text is None:
            return None
        return perplexity(m, tokenizer, text, seq_len=args.ppl_seq_len, max_tokens=args.ppl_max_tokens,
                          progress=progress, drop_last=not args.ppl_keep_tail).ppl

    before = {"params": count_parameters(model), "block": block_parameters(model), "ppl": ppl_of(model)}
    src = Path(args.model)
    before["size"] = size_on_disk(src) if src.is_dir() else None
    result = prune(model, cfg, tokenizer=tokenizer, calibration=args.calib, device=device, progress=progress)
    after = {"params": result.params_after, "block": block_parameters(model), "ppl": ppl_of(model)}
    save_pruned(model, out, tokenizer=tokenizer, config=cfg, plan=result.plan, source=str(args.model),
                overwrite=args.overwrite,
                extra={"params_before": before["params"], "params_after": after["params"],
                       **({"ppl_before": before["ppl"], "ppl_after": after["ppl"],
                           "ppl_protocol": f"{args.ppl}, first {args.ppl_max_tokens} tokens, "
                                           f"{args.ppl_seq_len}-token windows"
                                           f"{', tail window scored' if args.ppl_keep_tail else ''}"} if text is not None else {})})
    after["size"] = size_on_disk(out)
    rows = [("", "before", "after", "change"),
            ("parameters", f"{before['params']:,}", f"{after['params']:,}", relative_change(before["params"], after["params"])),
            ("decoder-block parameters", f"{before['block']:,}", f"{after['block']:,}", relative_change(before["block"], after["block"]))]
    if before["size"] is not None:
        rows.append(("size on disk (MB)", f"{before['size'] / 1e6:.2f}", f"{after['size'] / 1e6:.2f}",
                     relative_change(before["size"], after["size"])))
    if text is not None:
        rows.append((f"perplexity ({Path(args.ppl).name}, L={args.ppl_seq_len})", f"{before['ppl']:.2f}",
                     f"{after['ppl']:.2f}", relative_change(before["ppl"], after["ppl"])))
    print(f"\nllmprune: {args.method}, heads {args.heads:g}, ffn {args.ffn:g}, layers {args.layers}, "
          f"{f'experts {args.experts:g}, ' if args.experts else ''}"
          f"{args.allocation} allocation -> {out}")
    print(format_table(rows))
    if args.eval:
        from ..eval.api import evaluate

        original, _ = load_model(args.model, dtype=args.dtype, device=device, with_tokenizer=False)
        tasks = [t for t in args.eval_tasks.split(",") if t]
        evaluate({"dense": (original, tokenizer, str(src) if src.is_dir() else None),
                  "pruned": (model, tokenizer, str(out))},
                 ppl=args.ppl, seq_len=args.ppl_seq_len, max_tokens=args.ppl_max_tokens, tasks=tasks,
                 limit=args.eval_limit, out_dir=str(out) + "-eval", drop_last=not args.ppl_keep_tail,
                 progress=progress)
    return 0
