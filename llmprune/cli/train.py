"""``llmprune train``: train with stability-driven one-cycle pruning (OCSPruner): the structure is chosen while
the model trains, committed when the selection stops changing, removed, and training continues.

Example::

    llmprune train ../shared/models/ref-llama-7m --data ../shared/data/reference-train.txt --heads 0.25 --ffn 0.5 \\
        --schedule one-cycle --steps 300 --out runs/one-cycle
    llmprune train config.json --tokenizer ../shared/models/ref-llama-7m --data train.txt --ffn 0.5 --out runs/small

The stability curve is written next to the output as ``OUT.stability.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_output_arguments, check_output, add_ppl_arguments, ppl_function, ppl_protocol
from ._registry import subcommand
from .table import before_after_rows, format_table

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.one_cycle import SELECTION_METHODS, OneCycleConfig
    from ..training.recover import RecoveryConfig

    d, o = RecoveryConfig(), OneCycleConfig()
    p.add_argument("model", help="model folder / Hub id / .gguf file (prune while training), or a config.json "
                                 "(train from scratch)")
    p.add_argument("--tokenizer", help="tokenizer folder when MODEL is a config.json")
    p.add_argument("--data", required=True, metavar="FILE_OR_NAME", help="training text (its tail is held out)")
    p.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads removed")
    p.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN neurons removed")
    p.add_argument("--schedule", choices=("one-cycle",), default="one-cycle")
    p.add_argument("--method", choices=SELECTION_METHODS, default=o.method,
                   help="criterion of every selection (magnitude: the paper's group norm; wanda: activation-aware, "
                        "on recent training batches)")
    p.add_argument("--allocation", choices=("global", "uniform"), default=o.allocation,
                   help="global: one threshold over all layers under a per-layer cap (per-layer widths); uniform: "
                        "the same fraction from every layer (a standard checkpoint)")
    p.add_argument("--cap-limit", type=float, default=o.cap_limit,
                   help="per-layer cap limit * (1 - exp(-0.015 * channels)) of the global allocation")
    p.add_argument("--penalty-step", type=float, default=o.penalty_step,
                   help="growth of the group penalty per selection once the stability curve flattens")
    p.add_argument("--no-refit", action="store_true",
                   help="cut at the commit without refitting the output projections on recent training batches")
    p.add_argument("--select-every", type=int, default=o.select_every, help="steps between selections")
    p.add_argument("--threshold", type=float, default=o.threshold, help="stability at which the structure is committed")
    p.add_argument("--commit-by", type=float, default=o.commit_by, help="commit at this fraction of --steps at the latest")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--lora", action="store_true",
                   help="train LoRA adapters instead of every weight (selection and penalty on W + BA; at the commit "
                        "the adapters are merged, the units cut, and fresh adapters train the smaller model)")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-targets", default=d.lora_targets)
    p.add_argument("--teacher", help="distil from this model ('source': MODEL itself, before pruning)")
    p.add_argument("--kd-alpha", type=float, default=d.kd_alpha)
    p.add_argument("--seed", type=int, default=d.seed)
    add_output_arguments(p)
    add_ppl_arguments(p)


@subcommand("train", "train with one-cycle pruning (structure chosen during training, then removed)", add_arguments)
def run(args: argparse.Namespace) -> int:
    import copy

    from ..calibration.calibrate import read_calibration_text
    from ..checkpoint.io import load_config, load_model, load_tokenizer, save_pruned
    from ..training.one_cycle import OneCycle, OneCycleConfig
    from ..structured.pipeline import count_parameters
    from ..training.recover import RecoveryConfig, recover
    from .table import block_parameters

    out = check_output(args)
    text = read_calibration_text(args.data)
    src = Path(args.model)
    if src.suffix == ".json":  # from scratch: build the architecture, random weights
        from transformers import AutoModelForCausalLM

        if not args.tokenizer:
            raise ValueError("training from a config.json needs --tokenizer")
        model = AutoModelForCausalLM.from_config(load_config(src), trust_remote_code=False)
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        model, tokenizer = load_model(args.model)
    teacher = None
    if args.teacher == "source":
        teacher = copy.deepcopy(model).eval()
    elif args.teacher:
        teacher = load_model(args.teacher, with_tokenizer=False)[0]
    cfg = RecoveryConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                         warmup_steps=args.warmup_steps, eval_every=args.eval_every, full=not args.lora,
                         seed=args.seed, kd_alpha=args.kd_alpha, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                         lora_targets=args.lora_targets)
    one = OneCycleConfig(heads=args.heads, ffn=args.ffn, method=args.method, allocation=args.allocation,
                         cap_limit=args.cap_limit, penalty_step=args.penalty_step, refit=not args.no_refit,
                         select_every=args.select_every, threshold=args.threshold, commit_by=args.commit_by)
    one.validate()
    progress = not args.quiet
    ppl_of = ppl_function(args, tokenizer, progress)
    before = {"params": count_parameters(model), "block": block_parameters(model), "ppl": ppl_of(model)}
    callback = OneCycle(model, one, total_steps=cfg.steps)
    result = recover(model, cfg, data=text, tokenizer=tokenizer, teacher=teacher, progress=progress, callback=callback)
    model = result.model
    after = {"params": count_parameters(model), "block": block_parameters(model), "ppl": ppl_of(model),
             "extra_rows": [("structure committed at step", str(callback.committed_at)),
                            ("final stability", f"{callback.stability[-1]:.4f}" if callback.stability else "-")]}
    extra = {"one_cycle": {**callback.config.to_dict(), "stability": callback.stability,  # "auto" resolved
                           "committed_at": callback.committed_at},
             "recovery": cfg.to_dict(), "recovery_history": result.history, "training_data": args.data,
             "training_tokens": result.tokens}
    if args.ppl:
        extra.update(ppl_before=before["ppl"], ppl_after=after["ppl"], ppl_protocol=ppl_protocol(args))
    save_pruned(model, out, tokenizer=tokenizer, source=str(args.model), overwrite=args.overwrite,
                verify=not args.no_verify, extra=extra)
    callback.plot(str(out) + ".stability.png")
    print(f"\nllmprune: one-cycle training, {cfg.steps} steps, committed at step {callback.committed_at} -> {out}")
    print(format_table(before_after_rows(before, after, ppl_label=args.ppl and
                                         f"perplexity ({Path(args.ppl).name}, L={args.ppl_seq_len})")))
    return 0
