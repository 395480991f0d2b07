"""``llmprune recover``: train a pruned model back (LoRA through peft, merged; or full fine-tuning), optionally
distilled from the unpruned model, under ``accelerate``; saved (verified) as the same kind of checkpoint.

Example::

    llmprune recover runs/pruned --data ../shared/data/reference-train.txt --teacher ../shared/models/ref-llama-7m \\
        --steps 300 --ppl ../shared/data/wikitext2-raw-test.txt --out runs/recovered
    accelerate launch --multi_gpu --num_processes 2 -m llmprune recover runs/pruned --data train.txt --out runs/rec

A killed run continues with ``--resume`` (state in ``OUT.recover-state``, removed after the final save).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ._common import (add_output_arguments, add_ppl_arguments, add_runtime_arguments, already_complete, check_output,
                      ppl_function, ppl_protocol)
from ._registry import subcommand
from .table import before_after_rows, format_table

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.recover import RecoveryConfig

    d = RecoveryConfig()
    p.add_argument("model", help="pruned model folder (or any model folder / Hub id / .gguf file)")
    p.add_argument("--data", required=True, metavar="FILE_OR_NAME",
                   help="training text: a file, or wikitext2|c4|ptb (train split); its tail is the held-out slice")
    p.add_argument("--full", action="store_true", help="train every parameter instead of LoRA adapters")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha})")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--lora-targets", default="all-linear",
                   help="all-linear (every Linear in the decoder blocks) or comma-separated names, e.g. q_proj,v_proj")
    p.add_argument("--teacher", help="unpruned model (folder or Hub id) to distil from")
    p.add_argument("--kd-alpha", type=float, default=d.kd_alpha, help=f"weight of the distillation loss (default {d.kd_alpha})")
    p.add_argument("--kd-temperature", type=float, default=d.kd_temperature)
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step and process (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"window length (default {d.seq_len})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out evaluation every K steps; the best is kept")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows (the end of --data)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same --out")
    add_output_arguments(p)
    add_ppl_arguments(p)
    add_runtime_arguments(p)


@subcommand("recover", "train a pruned model back (LoRA or full, optional distillation) and save it", add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from ..calibration.calibrate import read_calibration_text
    from ..checkpoint.io import OutputExistsError, load_model, read_plan, read_recipe, save_pruned
    from ..core.config import PruneConfig
    from ..structured.pipeline import count_parameters
    from ..training.recover import STATE_DIR_SUFFIX, RecoveryConfig, recover
    from .table import block_parameters

    cfg = RecoveryConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seq_len=args.seq_len, warmup_steps=args.warmup_steps, full=args.full, lora_r=args.lora_r,
                         lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
                         kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, eval_every=args.eval_every,
                         eval_windows=args.eval_windows, seed=args.seed)
    state = Path(str(args.out) + STATE_DIR_SUFFIX)
    if already_complete(args, state):
        return 0
    out = check_output(args)
    if state.exists() and not args.resume:
        raise OutputExistsError(f"{state} holds an interrupted run: pass --resume to continue it, or remove it")
    text = read_calibration_text(args.data)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              cpu=(args.device == "cpu") or not torch.cuda.is_available())
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    teacher = load_model(args.teacher, dtype=args.dtype, with_tokenizer=False)[0] if args.teacher else None
    progress = not args.quiet and accelerator.is_main_process
    ppl_of = ppl_function(args, tokenizer, progress)
    main = accelerator.is_main_process
    before = {"params": count_parameters(model), "block": block_parameters(model),
              "ppl": ppl_of(model) if main else None}
    result = recover(model, cfg, data=text, tokenizer=tokenizer, teacher=teacher, state_dir=state,
                     resume=args.resume, progress=progress, accelerator=accelerator)
    model = result.model
    if main:
        after = {"params": count_parameters(model), "block": block_parameters(model), "ppl": ppl_of(model),
                 "extra_rows": [("held-out perplexity (best step)", f"{result.best_eval_ppl:.2f} @ {result.best_step}"),
                                ("training tokens", f"{result.tokens:,}")]}
        src = Path(args.model)
        prune_cfg, plan = None, None
        if src.is_dir() and (src / "llmprune_recipe.json").is_file():
            recipe = read_recipe(src)
            prune_cfg = PruneConfig.from_dict(recipe["config"]) if recipe.get("config") else None
            plan = read_plan(src) if (src / "llmprune_plan.json").is_file() else None
        from ..training.recipe import Recipe

        extra = {"run": Recipe(model=str(args.model), recover=cfg, data=args.data, teacher=args.teacher,
                               dtype=args.dtype).to_dict(),
                 "recovery": cfg.to_dict(), "recovery_history": result.history, "recovered_from": str(args.model),
                 "teacher": args.teacher, "training_data": args.data, "training_tokens": result.tokens,
                 "best_step": result.best_step, "best_eval_ppl": result.best_eval_ppl}
        if args.ppl:
            extra.update(ppl_before=before["ppl"], ppl_after=after["ppl"], ppl_protocol=ppl_protocol(args))
        save_pruned(model, out, tokenizer=tokenizer, config=prune_cfg, plan=plan, source=str(args.model),
                    overwrite=args.overwrite, verify=not args.no_verify, extra=extra)
        shutil.rmtree(state, ignore_errors=True)
        mode = "full fine-tuning" if cfg.full else f"LoRA r={cfg.lora_r}"
        print(f"\nllmprune: recovered with {mode}{', distilled' if teacher is not None else ''}, "
              f"{cfg.steps} steps, {result.seconds:.0f}s -> {out}")
        print(format_table(before_after_rows(before, after, ppl_label=args.ppl and
                                             f"perplexity ({Path(args.ppl).name}, L={args.ppl_seq_len})")))
    accelerator.wait_for_everyone()
    return 0
