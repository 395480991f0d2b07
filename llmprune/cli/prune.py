"""``llmprune prune``: structured pruning of a model folder or Hub id, saved (verified) with a before/after table.

Example::

    llmprune prune ../shared/models/ref-llama-7m --heads 0.25 --ffn 0.25 --method wanda \\
        --calib ../shared/data/reference-train.txt --ppl ../shared/data/wikitext2-raw-test.txt --out runs/pruned
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (add_obs_calibration_arguments, add_output_arguments, add_ppl_arguments, add_runtime_arguments,
                      check_output, is_main_process, ppl_function, ppl_protocol, read_calibration,
                      wait_for_everyone)
from ._registry import subcommand
from ._streaming import add_streaming_arguments, local_folder, refuse_with_streaming, run_streamed, wants_streaming
from .table import before_after_rows, budget_rows, format_table, unit_fraction_rows, width_rows

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..criteria import available_criteria

    p.add_argument("model", help="local model folder, Hugging Face Hub id, or a .gguf file (or a folder holding one; "
                                 "dequantised to float32, saved as plain safetensors)")
    p.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads removed (default 0)")
    p.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN neurons removed (default 0)")
    p.add_argument("--layers", type=int, default=0, help="number of whole decoder blocks removed (Block Influence)")
    p.add_argument("--experts", type=float, default=0.0,
                   help="fraction of experts removed from every mixture-of-experts layer (routing mass with --calib, "
                        "else weight norm); --ffn then prunes neurons inside each expert")
    p.add_argument("--hidden", type=float, default=0.0,
                   help="fraction of hidden (embedding) channels removed everywhere: embeddings, every norm, every "
                        "projection reading or writing the residual stream, the LM head (Minitron); applied before "
                        "--heads / --ffn. Llama-likes, Phi-3, Qwen3-MoE, Mixtral")
    p.add_argument("--hidden-method", choices=("minitron", "rms"), default="minitron",
                   help="how hidden channels are chosen: minitron (mean |activation| after every norm; default) or "
                        "rms (greedy on the normalised outputs' error with the RMS rescaling, each norm's weight "
                        "corrected in closed form for its new RMS)")
    p.add_argument("--params", type=float, default=0.0,
                   help="fraction of ALL parameters (embeddings included) to remove, split among --hidden, --heads and "
                        "--ffn: 4 candidate splits are pruned with a fast proxy and the one with the lowest "
                        "calibration loss is pruned with --method (give it instead of --hidden/--heads/--ffn)")
    p.add_argument("--method", default=None,
                   help=f"how units are chosen: {', '.join(available_criteria())}. Default: obs (structured optimal "
                        "brain surgeon: each layer's heads / neurons removed greedily by the output error left after "
                        "the optimal refit of o_proj / down_proj, weighed by the Fisher of the model's own "
                        "predictions) when only --heads / --ffn are given and not --streaming, on 128 x 1024 "
                        "calibration tokens (SmolLM2-135M: 25%% of block parameters, 28.8 -> 45.4 PPL at seed 0, "
                        "45.4-46.8 over four seeds of the windows, "
                        "in about 50 min on 1 CPU thread; --n-samples 64 halves the time); wanda otherwise (minutes). "
                        "Calibrated methods need --calib")
    p.add_argument("--allocation", choices=("uniform", "global", "error", "block_influence", "fisher"), default=None,
                   help="per-layer widths: fisher (default with obs: each kind's total goes where the estimated loss "
                        "increase is lowest; per-layer widths, reloads through llmprune or as a Mistral config), "
                        "uniform (same widths everywhere: a standard config; default for other methods), global "
                        "(normalised scores), error (the uniform setting's parameters removed where the output "
                        "reconstruction error is lowest; heads and FFN compete), block_influence (ratios within "
                        "+-spread, less pruning in high-influence layers)")
    p.add_argument("--attention-unit", choices=("auto", "group", "query"), default="auto",
                   help="group: remove whole KV groups; query: remove query heads evenly from every KV group; auto "
                        "(default): group for MHA, query with <= 4 KV heads (MQA, 2-4 groups), else group when "
                        "--heads x KV heads is within 0.25 of a whole number of groups, else query (resolved once; "
                        "the recipe and the table name the unit used)")
    p.add_argument("--rounding", choices=("nearest", "down", "up", "error"), default="nearest",
                   help="when --heads does not give whole units: round to the nearest valid count (default), "
                        "down, up, or stop with an error listing the valid ratios")
    p.add_argument("--multiple-of", type=int, default=1, help="round kept FFN widths to a multiple of this")
    p.add_argument("--min-keep", type=float, default=0.1,
                   help="non-uniform allocation: smallest fraction of a layer's heads / neurons kept")
    p.add_argument("--spread", type=float, default=0.1, help="block_influence allocation: ratios span 2*spread")
    p.add_argument("--bias-compensation", action="store_true",
                   help="add removed units' mean output to the o_proj/down_proj bias (FLAP)")
    p.add_argument("--reconstruct", action="store_true",
                   help="refit the projections that consume removed heads/neurons (o_proj, down_proj, ...) by least "
                        "squares on calibration inputs, layer by layer on the pruned model's activations")
    p.add_argument("--percdamp", type=float, default=0.01,
                   help="reconstruction damping, fraction of the mean Gram diagonal (default 0.01)")
    p.add_argument("--iterative-steps", type=int, default=1,
                   help="reach the target in K steps, recalibrating on the current model each time (default 1)")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="with --iterative-steps: recovery steps (LoRA defaults) after every step but the last")
    p.add_argument("--data", metavar="FILE_OR_NAME", help="training text for --recover-steps")
    p.add_argument("--teacher", help="with --recover-steps: distil from this model ('source': the input model)")
    add_obs_calibration_arguments(p, needed_by="needed by obs, wanda, flap, --reconstruct and --layers")
    p.add_argument("--fisher-samples", type=int, default=16,
                   help="allocation fisher: calibration windows of its one forward/backward pass (default 16)")
    p.add_argument("--fisher-diagonal", action="store_true",
                   help="allocation fisher: keep only the Fisher's diagonal (hidden floats per projection instead of "
                        "hidden^2; for very wide models)")
    p.add_argument("--fisher-labels", choices=("data", "model"), default=None,
                   help="allocation fisher: weigh errors by the loss of next tokens sampled from the unpruned model "
                        "(model, default: the true Fisher, the curvature of the KL divergence from the original model) "
                        "or of the calibration text's own next tokens (data: the empirical Fisher; on SmolLM2-135M at "
                        "25%%, 47.6 / 50.1 PPL at window seeds 0 / 1 against 45.4 / 46.8 with model)")
    p.add_argument("--refit-target", choices=("layer", "dense"), default="layer",
                   help="method obs: refit o_proj/down_proj towards the layer's own outputs on its current inputs "
                        "(layer, default) or towards the original model's outputs (dense: a second stream through "
                        "an unmodified copy of each layer, ~2x the layer forwards; 56.9 vs 51.8 PPL on SmolLM2 at 25%%)")
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


def resolve_method_defaults(args: argparse.Namespace) -> None:
    """The recommended recipe (:meth:`PruneConfig.recommended`) for what ``--method`` / ``--allocation`` /
    ``--n-samples`` / ``--seq-len`` leave unset: ``obs`` with the ``fisher`` allocation for heads and FFN neurons
    in memory (measured best on real models, BENCHMARKS.md), ``wanda`` (uniform) where obs does not apply:
    layer or expert removal, bias compensation, ``--streaming``."""
    from ..core.config import PruneConfig

    streaming = wants_streaming(args)
    args.streaming = streaming  # decided once (an automatic choice prints its reason once)
    rec = PruneConfig.recommended(streaming=streaming, method=args.method, allocation=args.allocation,
                                  layers=args.layers, experts=args.experts, bias_compensation=args.bias_compensation,
                                  n_samples=args.n_samples, seq_len=args.seq_len,
                                  fisher_labels=args.fisher_labels)
    args.seq_len_default = args.seq_len is None  # capped at the model's context once it is loaded
    args.method, args.allocation, args.n_samples, args.seq_len = rec.method, rec.allocation, rec.n_samples, rec.seq_len
    args.fisher_labels = rec.fisher_labels


@subcommand("prune", "prune heads, FFN neurons, layers or experts and save the smaller model", add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch
    from ..eval.efficiency import size_on_disk

    from ..core.config import PruneConfig
    from ..checkpoint.io import load_model, save_pruned
    from ..calibration.calibrate import read_calibration_text
    from ..structured.pipeline import PruneResult, count_parameters, prune
    from ..recipe import Recipe
    from ..structured.surgery import layer_widths
    from .table import block_parameters

    resolve_method_defaults(args)
    cfg = PruneConfig(heads=args.heads, ffn=args.ffn, layers=args.layers, experts=args.experts, method=args.method,
                      hidden=args.hidden, hidden_method=args.hidden_method, params=args.params,
                      allocation=args.allocation, attention_unit=args.attention_unit, rounding=args.rounding,
                      multiple_of=args.multiple_of, bias_compensation=args.bias_compensation,
                      min_keep=args.min_keep, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                      reconstruct=args.reconstruct, percdamp=args.percdamp, spread=args.spread,
                      fisher_samples=args.fisher_samples, fisher_diagonal=args.fisher_diagonal,
                      fisher_labels=args.fisher_labels, refit_target=args.refit_target)
    if args.recover_steps and not args.data:
        from ..calibration.calibrate import CalibrationError

        raise CalibrationError("--recover-steps needs training text: pass --data with a file or a dataset name")
    out = check_output(args) if not args.resume else Path(args.out)  # fail before any work
    calibration = read_calibration(args)
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    if args.export:  # a family llama.cpp cannot run, or no llama-cpp-python for the check: fail before any work
        from .export import check_export_possible

        check_export_possible(model.config, verify=not args.no_verify)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if args.seq_len_default and context and cfg.seq_len > context:
        import dataclasses

        cfg = dataclasses.replace(cfg, seq_len=int(context))
    from ..arch import get_adapter
    from ..structured.select import check_ratios, resolve_config

    cfg = resolve_config(model, get_adapter(model), cfg)  # attention_unit "auto" -> the concrete unit, once
    check_ratios(model, get_adapter(model), cfg)  # before perplexity or any other work
    main = is_main_process()  # under accelerate launch: every process calibrates, the main one evaluates and saves
    progress = not args.quiet and main
    ppl_of = ppl_function(args, tokenizer, progress) if main else (lambda m: None)

    src = Path(args.model)
    before = {"params": count_parameters(model), "block": block_parameters(model), "ppl": ppl_of(model),
              "size": size_on_disk(src) if src.is_dir() else None}
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
    after = {"params": result.params_after, "block": block_parameters(model), "ppl": ppl_of(model)}
    if args.iterative_steps <= 1 and calibration is not None:
        after["extra_rows"] = [("calibration tokens/s (through pruning)",
                                f"{cfg.n_samples * cfg.seq_len / max(seconds, 1e-9):,.0f}")]
    if not main:
        wait_for_everyone()
        return 0
    ppl_extra = ({"ppl_before": before["ppl"], "ppl_after": after["ppl"], "ppl_protocol": ppl_protocol(args)}
                 if args.ppl else {})
    done = result.config if args.iterative_steps <= 1 else cfg  # --params: the split it chose
    save_pruned(model, out, tokenizer=tokenizer, config=done, plan=result.plan, source=str(args.model),
                overwrite=args.overwrite, verify=not args.no_verify,
                extra={"params_before": before["params"], "params_after": after["params"],
                       "calibration": args.calib, **ppl_extra,
                       **({"params_budget": result.budget} if result.budget else {}),
                       "run": Recipe(model=str(args.model), prune=cfg, calibration=args.calib, dtype=args.dtype,
                                     iterative_steps=args.iterative_steps, recover_between=args.recover_steps,
                                     data=args.data, teacher=args.teacher).to_dict()})
    after["size"] = size_on_disk(out)
    print(f"\nllmprune: {args.method}, {args.allocation} allocation, {cfg.attention_unit} attention units -> {out}")
    rows = unit_fraction_rows(done, widths_before, layer_widths(model), result.plan)
    print(format_table(rows + width_rows(cfg, done, hidden_before, int(model.config.hidden_size), before["params"],
                                         after["params"])))
    if result.budget:
        print()
        print(format_table(budget_rows(result.budget)))
    print()
    print(format_table(before_after_rows(before, after, ppl_label=args.ppl and
                                         f"perplexity ({Path(args.ppl).name}, L={args.ppl_seq_len})")))
    if args.eval:
        from ..eval.api import evaluate

        original, _ = load_model(args.model, dtype=args.dtype, device=device, with_tokenizer=False)
        tasks = [t for t in args.eval_tasks.split(",") if t]
        evaluate({"dense": (original, tokenizer, str(src) if src.is_dir() else None),
                  "pruned": (model, tokenizer, str(out))},
                 ppl=args.ppl, seq_len=args.ppl_seq_len, max_tokens=args.ppl_max_tokens, tasks=tasks,
                 limit=args.eval_limit, out_dir=str(out) + "-eval", drop_last=not args.ppl_keep_tail,
                 progress=progress, verbose=args.verbose)
    if args.export:
        from .export import export_after_save, gguf_name

        print("\nllmprune: " + export_after_save(str(out), str(out / gguf_name(out, args.outtype)), args.outtype,
                                                verify=not args.no_verify, overwrite=False, threads=args.gguf_threads))
    wait_for_everyone()
    return 0


def _run_streaming(args: argparse.Namespace, cfg, calibration, out: Path) -> int:
    """``--streaming``: the same pruning, one layer in memory at a time (:func:`llmprune.streaming.prune_streaming`)."""
    from ..recipe import Recipe
    from ..streaming import prune_streaming

    refuse_with_streaming(args, **{"--ppl": args.ppl, "--eval": args.eval,
                                   "--iterative-steps": args.iterative_steps > 1})
    recipe = Recipe(model=str(args.model), prune=cfg, calibration=args.calib, dtype=args.dtype).to_dict()
    result, rows = run_streamed(args, prune_streaming, cfg, calibration, out, recipe,
                                f"{args.method}, {args.allocation} allocation")
    print(format_table(_streamed_unit_rows(cfg, local_folder(args.model), out, result.plan)))
    print()
    print(format_table(rows))
    return 0


def _streamed_unit_rows(cfg, src: Path, out: Path, plan) -> list[tuple[str, ...]]:
    """Requested vs achieved fractions of a streamed run, from the two checkpoints' configs (meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..structured.surgery import layer_widths

    widths = []
    for folder in (src, out):
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder), trust_remote_code=False))
        widths.append(layer_widths(model))
    return unit_fraction_rows(cfg, widths[0], widths[1], plan)
