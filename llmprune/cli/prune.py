"""``llmprune prune``: structured pruning of a model folder or Hub id, saved (verified) with a before/after table.

Example::

    llmprune prune ../shared/models/ref-llama-7m --heads 0.25 --ffn 0.25 \\
        --calib ../shared/data/reference-train.txt --ppl ../shared/data/wikitext2-raw-test.txt --out runs/pruned
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (add_calibration_text_argument, add_config_arguments, add_output_arguments, add_ppl_arguments,
                      add_runtime_arguments, already_complete, check_output, config_from_args, input_paths,
                      is_main_process, ppl_function, ppl_protocol, read_calibration, wait_for_everyone)
from ._registry import subcommand
from ._streaming import add_streaming_arguments, local_folder, refuse_with_streaming, run_streamed, wants_streaming
from .table import before_after_rows, budget_notes, budget_rows, format_table, unit_fraction_rows, width_rows

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..core.config import PruneConfig
    from ..structured.criteria import available_criteria, available_unit_criteria, get_criterion, get_unit_criterion

    p.add_argument("model", help="local model folder, Hugging Face Hub id, or a .gguf file (or a folder holding one; "
                                 "dequantised to float32, saved as plain safetensors)")
    methods = {n: get_criterion(n).description for n in available_criteria()}
    hidden = {n: get_unit_criterion("hidden", n).description for n in available_unit_criteria("hidden")}
    # every PruneConfig field, its help beside the field; registered names' choices and lines from their registry
    add_config_arguments(p, PruneConfig, registered={"method": methods, "hidden_method": hidden})
    add_calibration_text_argument(p, needed_by="needed by obs (the default), wanda, flap, --reconstruct and --layers; "
                                                "--vocab counts its tokens unless --vocab-text is given")
    p.add_argument("--iterative-steps", type=int, default=1,
                   help="reach the target in K steps, recalibrating on the current model each time (default 1)")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="with --iterative-steps: recovery steps (LoRA defaults) after every step but the last")
    p.add_argument("--data", metavar="FILE_OR_NAME", help="training text for --recover-steps")
    p.add_argument("--teacher", help="with --recover-steps: distil from this model ('source': the input model)")
    add_output_arguments(p)
    add_ppl_arguments(p)
    add_runtime_arguments(p)
    add_streaming_arguments(p)
    p.add_argument("--eval", action="store_true", help="run the eval harness on the original and pruned model at the end")
    p.add_argument("--eval-tasks", default="", help="tasks for --eval, e.g. lambada,piqa")
    p.add_argument("--eval-limit", type=int, default=None, help="documents per task for --eval")
    from .export import add_export_arguments

    p.add_argument("--export", choices=("gguf",), default=None,
                   help="also write the pruned model as a GGUF file for llama.cpp / Ollama into the output folder "
                        "(<out>/<name>-<OUTTYPE>.gguf, checked in llama.cpp; needs llmprune[llamacpp] unless --no-verify)")
    add_export_arguments(p, standalone=False)


@subcommand("prune", "prune heads, FFN neurons, layers, experts or vocabulary and save the smaller model", add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch
    from ..eval.efficiency import size_on_disk

    from ..core.config import PruneConfig
    from ..checkpoint.io import load_model, save_pruned
    from ..calibration.calibrate import check_calibration_fits, read_calibration_text
    from ..streaming import parse_memory
    from ..structured.pipeline import PruneResult, count_parameters, prune
    from ..training.recipe import Recipe
    from ..arch.surgery import layer_widths
    from .table import block_parameters

    args.streaming = wants_streaming(args)  # decided once (an automatic choice prints its reason once)
    cfg = config_from_args(PruneConfig, args)
    if args.recover_steps and not args.data:
        from ..calibration.calibrate import CalibrationError

        raise CalibrationError("--recover-steps needs training text: pass --data with a file or a dataset name")
    if already_complete(args):
        return 0
    out = check_output(args)  # fail before any work
    if args.eval:  # its report folder too
        from ..checkpoint.output import check_output_path

        check_output_path(str(out) + "-eval", sources=input_paths(args), overwrite=args.overwrite, flag="--eval report")
    calibration = read_calibration(args)
    if cfg.vocab and not args.streaming:  # the text whose tokens are counted: there, before any work
        if cfg.vocab_text:
            read_calibration_text(cfg.vocab_text)  # a missing file or dataset fails here, not after the model loads
        elif calibration is None:
            from ..calibration.calibrate import CalibrationError

            raise CalibrationError("--vocab counts tokens in a text: pass --calib FILE or --vocab-text FILE")
    if wants_streaming(args):
        if args.export:
            from transformers import AutoConfig

            from .export import check_export_possible

            check_export_possible(AutoConfig.from_pretrained(str(args.model), trust_remote_code=False),
                                  verify=not args.no_verify)
        rc = _run_streaming(args, cfg, calibration, out)
        if args.export and rc == 0:
            from .export import export_after_save, gguf_name

            print("\nllmprune: " + export_after_save(str(out), str(out / gguf_name(out, args.outtype)), args.outtype,
                                                    verify=not args.no_verify, overwrite=False,
                                                    threads=args.gguf_threads))
        return rc
    if args.iterative_steps > 1 and (cfg.hidden or cfg.params):
        raise ValueError("--iterative-steps does not take --hidden / --params yet: prune the hidden size in one step")
    if args.iterative_steps > 1 and cfg.vocab:
        raise ValueError("--iterative-steps does not take --vocab yet: prune the vocabulary in one step")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    if args.export:  # a family llama.cpp cannot run, or no llama-cpp-python for the check: fail before any work
        from .export import check_export_possible

        check_export_possible(model.config, verify=not args.no_verify)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if args.seq_len is None and context and cfg.seq_len > context:
        import dataclasses

        cfg = dataclasses.replace(cfg, seq_len=int(context))
    if calibration is not None:  # before perplexity or any other work
        check_calibration_fits(model.config, cfg.n_samples, cfg.seq_len, parse_memory(args.max_memory))
    from ..arch import get_adapter
    from ..structured.select import check_ratios, resolve_config

    cfg = resolve_config(model, get_adapter(model), cfg)  # "auto" unit, default allocation -> concrete, once
    check_ratios(model, get_adapter(model), cfg)  # before perplexity or any other work
    main = is_main_process()  # under accelerate launch: every process calibrates, the main one evaluates and saves
    progress = not args.quiet and main
    ppl_of = ppl_function(args, tokenizer, progress, full=True) if main else (lambda m, tok=None: None)

    src = Path(args.model)
    ppl_before = ppl_of(model)
    before = {"params": count_parameters(model), "block": block_parameters(model),
              "ppl": ppl_before and ppl_before.ppl, "bpb": ppl_before and ppl_before.bits_per_byte,
              "size": size_on_disk(src) if src.is_dir() else None}
    vocab_before = int(model.get_input_embeddings().weight.shape[0])
    hidden_before = int(model.config.hidden_size)
    widths_before = layer_widths(model)
    if args.iterative_steps > 1:
        from ..training.iterative import prune_iteratively
        from ..training.recover import RecoveryConfig

        data = read_calibration_text(args.data) if args.data else None
        teacher = None
        if args.teacher:
            teacher = load_model(args.model if args.teacher == "source" else args.teacher, dtype=args.dtype,
                                 with_tokenizer=False)[0]
        it = prune_iteratively(model, cfg, args.iterative_steps,
                               recovery=RecoveryConfig(steps=args.recover_steps) if args.recover_steps else None,
                               data=data, tokenizer=tokenizer, calibration=calibration, teacher=teacher,
                               progress=progress, device=device)
        model = it.model
        result = PruneResult(model=model, plan=None, config=cfg, params_before=it.params_before,
                             params_after=it.params_after)
    else:
        import time

        t0 = time.perf_counter()
        result = prune(model, cfg, tokenizer=tokenizer, calibration=calibration, device=device, progress=progress)
        seconds = time.perf_counter() - t0
    # --vocab: the rewritten tokenizer from here on (perplexity after, the save, --eval)
    new_tokenizer = tokenizer if getattr(result, "tokenizer", None) is None else result.tokenizer
    ppl_after = ppl_of(model, new_tokenizer)
    after = {"params": result.params_after, "block": block_parameters(model), "ppl": ppl_after and ppl_after.ppl,
             "bpb": ppl_after and ppl_after.bits_per_byte}
    units = cfg.heads or cfg.ffn or cfg.layers or cfg.experts or cfg.hidden or cfg.params
    if args.iterative_steps <= 1 and calibration is not None and units:  # --vocab alone only counts tokens
        after["extra_rows"] = [("calibration tokens/s (through pruning)",
                                f"{cfg.n_samples * cfg.seq_len / max(seconds, 1e-9):,.0f}")]
    if not main:
        wait_for_everyone()
        return 0
    ppl_extra = ({"ppl_before": before["ppl"], "ppl_after": after["ppl"], "bpb_before": before["bpb"],
                  "bpb_after": after["bpb"], "ppl_protocol": ppl_protocol(args)} if args.ppl else {})
    done = result.config if args.iterative_steps <= 1 else cfg  # --params: the split it chose
    save_pruned(model, out, tokenizer=new_tokenizer, config=done, plan=result.plan, source=str(args.model),
                overwrite=args.overwrite, verify=not args.no_verify,
                extra={"params_before": before["params"], "params_after": after["params"],
                       "calibration": args.calib, **ppl_extra,
                       **({"params_budget": result.budget} if result.budget else {}),
                       "run": Recipe(model=str(args.model), prune=cfg, calibration=args.calib, dtype=args.dtype,
                                     iterative_steps=args.iterative_steps, recover_between=args.recover_steps,
                                     data=args.data, teacher=args.teacher).to_dict()})
    after["size"] = size_on_disk(out)
    print(f"\nllmprune: {done.method}, {done.allocation} allocation, {done.attention_unit} attention units -> {out}"
          if units else f"\nllmprune: vocabulary pruned -> {out}")
    rows = unit_fraction_rows(done, widths_before, layer_widths(model), result.plan)
    print(format_table(rows + width_rows(cfg, done, hidden_before, int(model.config.hidden_size), before["params"],
                                         after["params"], vocab_before,
                                         int(model.get_input_embeddings().weight.shape[0]))))
    if result.budget:
        print()
        print(format_table(budget_rows(result.budget)))
        for line in budget_notes(result.budget):
            print(line)
    print()
    print(format_table(before_after_rows(before, after, ppl_label=args.ppl and
                                         f"perplexity ({Path(args.ppl).name}, L={args.ppl_seq_len})")))
    if args.eval:
        from ..eval.api import evaluate

        original, _ = load_model(args.model, dtype=args.dtype, device=device, with_tokenizer=False)
        tasks = [t for t in args.eval_tasks.split(",") if t]
        evaluate({"dense": (original, tokenizer, str(src) if src.is_dir() else None),
                  "pruned": (model, new_tokenizer, str(out))},
                 ppl=args.ppl, seq_len=args.ppl_seq_len, max_tokens=args.ppl_max_tokens, tasks=tasks,
                 limit=args.eval_limit, out_dir=str(out) + "-eval", drop_last=not args.ppl_keep_tail,
                 progress=progress, verbose=args.verbose, overwrite=args.overwrite)
    if args.export:
        from .export import export_after_save, gguf_name

        print("\nllmprune: " + export_after_save(str(out), str(out / gguf_name(out, args.outtype)), args.outtype,
                                                verify=not args.no_verify, overwrite=False, threads=args.gguf_threads))
    wait_for_everyone()
    return 0


def _run_streaming(args: argparse.Namespace, cfg, calibration, out: Path) -> int:
    """``--streaming``: the same pruning, one layer in memory at a time (:func:`llmprune.streaming.prune_streaming`)."""
    from ..training.recipe import Recipe
    from ..streaming import prune_streaming

    refuse_with_streaming(args, **{"--ppl": args.ppl, "--eval": args.eval,
                                   "--iterative-steps": args.iterative_steps > 1})
    recipe = Recipe(model=str(args.model), prune=cfg, calibration=args.calib, dtype=args.dtype).to_dict()
    result, rows = run_streamed(args, prune_streaming, cfg, calibration, out, recipe,
                                lambda res: f"{res.config.method}, {res.config.allocation} allocation")
    print(format_table(_streamed_unit_rows(cfg, local_folder(args.model), out, result.plan)))
    print()
    print(format_table(rows))
    return 0


def _streamed_unit_rows(cfg, src: Path, out: Path, plan) -> list[tuple[str, ...]]:
    """Requested vs achieved fractions of a streamed run, from the two checkpoints' configs (meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..arch.surgery import layer_widths

    widths = []
    for folder in (src, out):
        with init_empty_weights(include_buffers=False):
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        widths.append(layer_widths(model))
    return unit_fraction_rows(cfg, widths[0], widths[1], plan)
