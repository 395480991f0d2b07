"""``llmprune sparsify``: weight sparsity (unstructured or N:M) and TEAL activation-sparsity thresholds, saved
(verified) as a standard checkpoint with the same before/after table as ``prune``.

Example::

    llmprune sparsify ../shared/models/ref-llama-7m --method sparsegpt --sparsity 0.5 --pattern 2:4 \\
        --calib ../shared/data/reference-train.txt --ppl ../shared/data/wikitext2-raw-test.txt --out runs/sparse
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (add_calibration_arguments, add_output_arguments, add_ppl_arguments, add_runtime_arguments,
                      already_complete, check_output, is_main_process, ppl_function, ppl_protocol, read_calibration,
                      wait_for_everyone)
from ._registry import subcommand
from ._streaming import add_streaming_arguments, refuse_with_streaming, run_streamed, wants_streaming
from .table import before_after_rows, format_table

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..sparsity import (SparsityConfig, available_activation_methods, available_sparsity_allocations,
                            available_sparsity_methods, get_activation_method, get_sparsity_allocation,
                            get_sparsity_method)

    # choices and help come from the registries: each method's and allocation's own line
    methods = [get_sparsity_method(m) for m in available_sparsity_methods()]
    allocations = [get_sparsity_allocation(a) for a in available_sparsity_allocations()]
    activation = [get_activation_method(a) for a in available_activation_methods()]
    with_data = ", ".join(m.name for m in methods if m.needs_calibration)
    default = SparsityConfig.method
    p.add_argument("model", help="local model folder, Hugging Face Hub id, or a .gguf file (or a folder holding one)")
    p.add_argument("--method", default=default, choices=[m.name for m in methods],
                   help="; ".join(f"{m.name}: {m.description}" for m in methods)
                   + f" (default {default}; {with_data} need --calib)")
    p.add_argument("--allocation", default=SparsityConfig.allocation, choices=[a.name for a in allocations],
                   help="; ".join(f"{a.name}: {a.description}" for a in allocations)
                   + f" (default {SparsityConfig.allocation})")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights zeroed in every target layer (default 0.5; 0 with only activation sparsity)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M such as 2:4 (sparsity 1-N/M)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module-name patterns inside the decoder blocks (default: every linear layer)")
    p.add_argument("--activation-sparsity", type=float, default=0.0, metavar="R",
                   help="also calibrate TEAL thresholds zeroing a fraction R of each target layer's inputs; they are "
                        "stored in the recipe (llmprune.sparsity.read_activation_thresholds)")
    p.add_argument("--activation-method", default="teal", choices=[a.name for a in activation],
                   help="how --activation-sparsity thresholds are calibrated: "
                        + "; ".join(f"{a.name}: {a.description}" for a in activation) + " (default teal)")
    add_calibration_arguments(p, n_samples=128, needed_by=f"needed by {with_data} and --activation-sparsity")
    add_output_arguments(p)
    add_ppl_arguments(p)
    add_runtime_arguments(p)
    add_streaming_arguments(p)


@subcommand("sparsify", "zero weights (unstructured or N:M) and/or calibrate activation sparsity, and save "
           "(dense safetensors with the zeros: transformers and vLLM load it as is)", add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.efficiency import size_on_disk
    from ..checkpoint.io import load_model, save_pruned
    from ..structured.pipeline import count_parameters
    from ..sparsity import (SparsityConfig, apply_activation_sparsity, get_activation_method,
                            measure_activation_sparsity, sparsify)
    from ..sparsity._common import DEFAULT_TARGETS
    from .table import block_parameters

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else list(DEFAULT_TARGETS)
    seq_len_default, args.seq_len = args.seq_len is None, args.seq_len or 256  # the default is capped once loaded
    cfg = SparsityConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, targets=targets,
                         n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, allocation=args.allocation)
    act = args.activation_sparsity
    if not 0.0 <= act < 1.0:
        raise ValueError(f"--activation-sparsity {act:g} is out of range: it is the fraction of inputs zeroed, in [0, 1)")
    if cfg.sparsity == 0 and act == 0:
        raise ValueError("nothing to do: give --sparsity > 0 and/or --activation-sparsity > 0")
    if already_complete(args):
        return 0
    out = check_output(args)
    calibration = read_calibration(args)
    if calibration is None and (cfg.needs_calibration or act > 0):
        from ..calibration.calibrate import CalibrationError

        needs = f"--method {cfg.method}" if cfg.needs_calibration else "--activation-sparsity"
        raise CalibrationError(f"{needs} needs calibration data: pass --calib with a text file or wikitext2|c4|ptb")
    if wants_streaming(args):
        return _run_streaming(args, cfg, calibration, out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    if calibration is not None:  # before perplexity or any other work
        import dataclasses

        from ..calibration.calibrate import check_calibration_fits, model_context
        from ..streaming import parse_memory

        context = model_context(model.config)
        if seq_len_default and context and args.seq_len > context:  # recorded as used
            args.seq_len = context
            cfg = dataclasses.replace(cfg, seq_len=context)
        check_calibration_fits(model.config, args.n_samples, args.seq_len, parse_memory(args.max_memory))
    main = is_main_process()  # under accelerate launch: every process calibrates, the main one evaluates and saves
    progress = not args.quiet and main
    ppl_of = ppl_function(args, tokenizer, progress) if main else (lambda m: None)

    def nonzero(m: torch.nn.Module) -> int:
        return sum(int(torch.count_nonzero(p)) for p in {id(p): p for p in m.parameters()}.values())

    src = Path(args.model)
    before = {"params": count_parameters(model), "block": block_parameters(model), "nonzero": nonzero(model),
              "ppl": ppl_of(model), "size": size_on_disk(src) if src.is_dir() else None}
    report = sparsify(model, cfg, tokenizer=tokenizer, calibration=calibration, progress=progress, device=device)
    from ..training.recipe import Recipe

    extra_rows, extra = [], {"sparsity_config": cfg.to_dict(), "weight_sparsity": report.overall_sparsity,
                             "calibration": args.calib,
                             "run": Recipe(model=str(args.model), sparsify=cfg, calibration=args.calib,
                                           dtype=args.dtype).to_dict()}
    handle = None
    if act > 0:
        calibrate = get_activation_method(args.activation_method).calibrate
        thresholds = calibrate(model, tokenizer, calibration, sparsity=act, targets=targets, n_samples=args.n_samples,
                               seq_len=args.seq_len, seed=args.seed, progress=progress, device=device)
        # measured on windows other than the calibration ones (another seed)
        achieved = measure_activation_sparsity(model, thresholds, calibration, tokenizer,
                                               n_samples=min(args.n_samples, 16), seq_len=args.seq_len,
                                               seed=args.seed + 1)["__overall__"]
        extra["activation_sparsity"] = {"target": act, "achieved": achieved, "thresholds": thresholds}
        extra_rows.append(("activation sparsity (inputs zeroed)", f"{achieved:.3f}"))
        handle = apply_activation_sparsity(model, thresholds)
    after_ppl = ppl_of(model)  # with the thresholds applied, as the model runs
    if handle is not None:
        handle.remove()
    if calibration is not None and cfg.needs_calibration:
        extra_rows.insert(0, ("calibration tokens/s (through pruning)",
                              f"{cfg.n_samples * cfg.seq_len / max(report.seconds, 1e-9):,.0f}"))
    after = {"params": count_parameters(model), "block": block_parameters(model), "nonzero": nonzero(model),
             "ppl": after_ppl, "extra_rows": extra_rows}
    before["sparsity"], after["sparsity"] = 0.0, report.overall_sparsity
    if not main:
        wait_for_everyone()
        return 0
    if args.ppl:
        extra.update(ppl_before=before["ppl"], ppl_after=after["ppl"], ppl_protocol=ppl_protocol(args))
    save_pruned(model, out, tokenizer=tokenizer, source=str(args.model), overwrite=args.overwrite,
                verify=not args.no_verify, extra=extra)
    after["size"] = size_on_disk(out)
    pattern = "" if cfg.pattern == "unstructured" else f" {cfg.pattern}"
    print(f"\nllmprune: {cfg.method}{pattern} weight sparsity {cfg.sparsity:g}"
          f"{f', activation sparsity {act:g}' if act else ''} -> {out}")
    print(format_table(before_after_rows(before, after, ppl_label=args.ppl and
                                         f"perplexity ({Path(args.ppl).name}, L={args.ppl_seq_len})")))
    wait_for_everyone()
    return 0


def _run_streaming(args: argparse.Namespace, cfg, calibration, out: Path) -> int:
    """``--streaming``: the same weight sparsity and activation thresholds, one layer in memory at a time."""
    from ..training.recipe import Recipe
    from ..streaming import sparsify_streaming

    refuse_with_streaming(args, **{"--ppl": args.ppl})
    recipe = Recipe(model=str(args.model), sparsify=cfg, calibration=args.calib, dtype=args.dtype).to_dict()
    pattern = "" if cfg.pattern == "unstructured" else f" {cfg.pattern}"
    act = args.activation_sparsity
    title = f"{cfg.method}{pattern} weight sparsity {cfg.sparsity:g}" + (f", activation sparsity {act:g}" if act else "")
    result, rows = run_streamed(args, sparsify_streaming, cfg, calibration, out, recipe, title,
                                activation_sparsity=act, activation_method=args.activation_method)
    rows.insert(2, ("weight sparsity (targets)", "0.000", f"{result.report['overall_sparsity']:.3f}", ""))
    if act:  # not measured on other windows here (that needs whole-model forwards): the calibrated target
        rows.insert(3, ("activation sparsity (calibrated target)", "", f"{act:.3f}", ""))
    print(format_table(rows))
    return 0
