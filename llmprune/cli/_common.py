"""Options and steps shared by the subcommands that load, change and save a model (``prune``, ``sparsify``),
so both take the same flags and fail the same way."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_global_arguments", "add_calibration_arguments", "add_output_arguments", "add_ppl_arguments",
           "add_runtime_arguments", "configure_output", "init_distributed", "is_main_process", "wait_for_everyone",
           "check_output", "input_paths", "already_complete", "read_calibration", "ppl_function", "ppl_protocol"]


def add_global_arguments(p: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose``, given to every subcommand."""
    p.add_argument("--quiet", action="store_true", help="no progress bars or library info messages")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' own warnings (transformers, datasets, lm-eval), hidden by default")


def add_calibration_arguments(p: argparse.ArgumentParser, n_samples: int, needed_by: str) -> None:
    p.add_argument("--calib", metavar="FILE_OR_NAME",
                   help=f"calibration text: a file, or wikitext2|c4|ptb (train split, via datasets); {needed_by}")
    p.add_argument("--n-samples", type=int, default=n_samples, help=f"calibration windows (default {n_samples})")
    p.add_argument("--seq-len", type=int, default=None,
                   help="calibration window length (default 256, capped at the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")


def add_config_arguments(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                         registered: dict[str, dict[str, str]] | None = None) -> None:
    """One ``--field-name`` option per field of the dataclass ``cls``, with the help text kept beside the field
    (its ``metadata["help"]``; ``metadata["default_help"]`` words a ``None`` default), its type and choices from
    the annotation, and no default of its own: an option left out keeps the field's default
    (:func:`config_from_args`). ``registered``: for a field whose values are registered names (field -> {name:
    description}, from a registry the config's own layer cannot import), the choices, and each one's description
    appended to the help."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = ("default: " + f.metadata["default_help"] if "default_help" in f.metadata
                 else f"default {default}" if default is not None else "default: the method's own")
        names = (registered or {}).get(f.name)
        described = ": " + "; ".join(f"{n}: {d}" for n, d in names.items()) if names else ""
        help_text = f"{f.metadata.get('help', '')}{described} ({shown})".replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
            continue
        choices = list(names) if names else [c for c in _literal_choices(hints[f.name]) if c is not None]
        if choices:
            p.add_argument(flag, dest=f.name, choices=choices, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=str if default is None else type(default), default=None,
                           help=help_text)


def _literal_choices(hint: Any) -> list[Any]:
    import typing

    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [c for arg in typing.get_args(hint) for c in _literal_choices(arg)]  # Optional[Literal[...]]


def config_from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """``cls`` built from the parsed options by field name: each option given wins, each left out keeps the
    field's default (one default per setting, in the config)."""
    import dataclasses

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    return cls(**{**given, **fixed})


def add_calibration_text_argument(p: argparse.ArgumentParser, needed_by: str) -> None:
    p.add_argument("--calib", metavar="FILE_OR_NAME",
                   help=f"calibration text: a file, or wikitext2|c4|ptb (train split, via datasets); {needed_by}")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the saved model to compare outputs (for models whose second copy does not "
                        "fit); saved keys and shapes are still checked")


def add_ppl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ppl", metavar="FILE_OR_NAME",
                   help="before/after perplexity on a text file, or wikitext2|c4|ptb (test split, via datasets)")
    p.add_argument("--ppl-seq-len", type=int, default=256, help="perplexity window length (default 256)")
    p.add_argument("--ppl-max-tokens", type=int, default=60000, help="perplexity on the first N tokens (default 60000)")
    p.add_argument("--ppl-keep-tail", action="store_true",
                   help="also score the last partial window (all --ppl-max-tokens tokens are predicted)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="device for calibration and evaluation (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="load dtype (float32, bfloat16, float16; default: the checkpoint's)")


def init_distributed() -> None:
    """Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) join the process group, so calibration
    statistics are reduced across processes and only the main process writes. Nothing happens in a plain run.

    Without CUDA the group uses gloo on CPU. (accelerate 1.x's ``launch --cpu`` starts a single process unless
    given an MPI hostfile; on a CPU-only machine ``accelerate launch --multi_gpu --num_processes N`` or
    ``torchrun --nproc_per_node N`` start N CPU processes.)
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    from ..calibration.calibrate import world

    return world()[0] == 0


def wait_for_everyone() -> None:
    from ..calibration.calibrate import world

    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def configure_output(args: argparse.Namespace) -> None:
    """Quiet the libraries: their warnings only with ``--verbose``, their progress bars not with ``--quiet``."""
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if verbose:
        return
    level = logging.ERROR
    for name in ("lm-eval", "lm_eval", "datasets", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", module=r"(lm_eval|datasets|transformers)(\..*)?")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if quiet:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


def input_paths(args: argparse.Namespace) -> list[str]:
    """Every file or folder the command reads (model, teacher, tokenizer, texts): none may be the output or
    under it, so ``--overwrite`` can never delete an input."""
    names = ("model", "teacher", "tokenizer", "calib", "data", "ppl", "recipe", "vocab_text")
    return [v for v in (getattr(args, n, None) for n in names) if isinstance(v, str) and v]


def check_output(args: argparse.Namespace) -> Path:
    """``--out``, checked before any work (:func:`llmprune.checkpoint.output.check_output_path`): not a file,
    not an input or a folder holding one, writable, and new unless ``--overwrite``."""
    from ..checkpoint.output import check_output_path

    return check_output_path(args.out, sources=input_paths(args), overwrite=args.overwrite)


def already_complete(args: argparse.Namespace, state: Path | None = None) -> bool:
    """``--resume`` after the run to ``--out`` had finished: ``--out`` holds a saved model and no interrupted
    run's ``state`` folder (default: a streamed run's ``.OUT.partial``) is left. Says so; the command then exits
    0 without work."""
    from ..checkpoint.io import RECIPE_FILE

    out = Path(args.out)
    partial = state if state is not None else out.with_name(f".{out.name}.partial")
    if not (getattr(args, "resume", False) and not args.overwrite and (out / RECIPE_FILE).is_file()
            and not partial.exists()):
        return False
    print(f"llmprune: {out} is already complete (a finished run; nothing to resume); pass --overwrite to redo it")
    return True


def read_calibration(args: argparse.Namespace) -> str | None:
    """The ``--calib`` text, read before the model is loaded so a bad source fails fast."""
    if not args.calib:
        return None
    from ..calibration.calibrate import read_calibration_text

    return read_calibration_text(args.calib)


def ppl_function(args: argparse.Namespace, tokenizer: Any, progress: bool,
                 full: bool = False) -> Callable[..., Any]:
    """``model[, tokenizer] -> perplexity`` on ``--ppl`` (``None`` without it); the text is read once, up front.
    ``full``: the whole :class:`~llmprune.eval.perplexity.PerplexityResult` (bits per byte too); a tokenizer given
    to the function (a vocabulary-pruned model's) replaces ``tokenizer``."""
    if not args.ppl:
        return lambda model, tok=None: None
    from ..eval.perplexity import load_text, perplexity

    text = load_text(args.ppl)

    def ppl(model: Any, tok: Any = None) -> Any:
        result = perplexity(model, tok if tok is not None else tokenizer, text, seq_len=args.ppl_seq_len,
                            max_tokens=args.ppl_max_tokens, progress=progress, drop_last=not args.ppl_keep_tail)
        return result if full else result.ppl

    return ppl


def ppl_protocol(args: argparse.Namespace) -> str:
    from ..checkpoint.io import public_name

    return (f"{public_name(args.ppl, keep_relative=True)}, first {args.ppl_max_tokens} tokens, "
            f"{args.ppl_seq_len}-token windows"
            f"{', tail window scored' if args.ppl_keep_tail else ''}")
