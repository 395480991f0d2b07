"""Loading checkpoints safely and saving pruned models atomically, with recipe, plan and model card.

Saved folder layout::

    out/
      config.json, model.safetensors (+ index if sharded), generation_config.json, tokenizer files
      llmprune_recipe.json   # versioned: PruneConfig, source model, parameter counts, llmprune version
      llmprune_plan.json     # kept head / KV-head / neuron indices per original layer, removed layers
      README.md              # model card (base_model, library_name, tags)

Example::

    model, tok = load_model("path/or/hub-id")
    save_pruned(result, "out/", tokenizer=tok, source="path/or/hub-id")
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import RECIPE_VERSION, PruneConfig, PrunePlan
from .errors import CheckpointError, OutputExistsError, OutputPathError
from .gguf_load import find_gguf, load_gguf
from .output import atomic_directory, check_output_path, replace_directory
from .verify import LOAD_KWARGS, VerificationError, verify_saved_model

__all__ = [
    "CheckpointError",
    "OutputExistsError",
    "OutputPathError",
    "check_output_path",
    "check_safetensors",
    "read_safetensors_header",
    "replace_directory",
    "load_model",
    "load_tokenizer",
    "load_config",
    "save_pruned",
    "write_metadata",
    "public_name",
    "public_recipe",
    "drop_custom_code",
    "read_recipe",
    "read_plan",
    "atomic_directory",
    "verify_saved_model",
    "VerificationError",
]

RECIPE_FILE = "llmprune_recipe.json"
PLAN_FILE = "llmprune_plan.json"




def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """A ``.safetensors`` file's header (``{name: {"dtype", "shape", "data_offsets"}}``, ``__metadata__``
    removed), validated against the file's length without loading tensors."""
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{p}: corrupt safetensors header (declares {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{p}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{p}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")
    return header


def check_safetensors(path: str | os.PathLike) -> None:
    """Validate a ``.safetensors`` file's header and length without loading tensors."""
    read_safetensors_header(path)


def _check_local_checkpoint(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: pickled weights are not loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{path} has no .safetensors weights{hint}")
    for w in weights:
        check_safetensors(w)


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a causal LM (local folder, Hub id, or a ``.gguf`` file / a folder holding one) from safetensors
    or GGUF only, and its tokenizer. GGUF weights are dequantised into ``dtype`` (float32 by default) and the
    model forgets its ``quantization_config``, so every save is plain safetensors.

    Local folders are validated first, so a corrupt or truncated checkpoint gives a clear
    :class:`CheckpointError` instead of a deep stack trace. ``trust_remote_code`` is never enabled.
    """
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path)
    is_local = path.exists()
    gguf = find_gguf(path) if is_local else None
    if gguf is not None:
        return load_gguf(gguf, dtype=dtype, device=device, with_tokenizer=with_tokenizer)
    if is_local:
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the model folder (or a .gguf file)")
        _check_local_checkpoint(path)
        from .compressed_tensors import refuse_sparse_compressed  # transformers 5.x would load them at random
        refuse_sparse_compressed(path, {w.name: read_safetensors_header(w) for w in sorted(path.glob("*.safetensors"))})
    elif str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"model folder {str(name_or_path)!r} does not exist")
    kwargs: dict[str, Any] = dict(LOAD_KWARGS)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if revision is not None:
        kwargs["revision"] = revision
    model = _hf_load(str(name_or_path), "model",
                     lambda: AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs))
    if device is not None:
        model.to(device)
    tokenizer = load_tokenizer(str(name_or_path), revision=revision) if with_tokenizer else None
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None) -> Any:
    """``AutoTokenizer.from_pretrained`` that never runs a folder's own code (``auto_map``); errors in one line.

    Example::

        tok = load_tokenizer("../shared/models/ref-llama-7m")
    """
    from transformers import AutoTokenizer

    return _hf_load(str(name_or_path), "tokenizer",
                    lambda: AutoTokenizer.from_pretrained(str(name_or_path), revision=revision,
                                                          trust_remote_code=False))


def load_config(name_or_path: str | os.PathLike) -> Any:
    """``AutoConfig.from_pretrained`` that never runs a folder's own code; errors in one line."""
    from transformers import AutoConfig

    return _hf_load(str(name_or_path), "config",
                    lambda: AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=False))


def _hf_load(name: str, what: str, load: Any) -> Any:
    """Run a transformers loader; its errors (often several lines, or a bare ``KeyError``) become one
    :class:`CheckpointError` line that says what is wrong."""
    try:
        return load()
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(_one_line(name, what, exc)) from exc


def _one_line(name: str, what: str, exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if "custom code" in text or "trust_remote_code" in text:
        return (f"{name}: its {what} needs custom code (auto_map); llmprune never runs code from a model folder or "
                "the Hub: use a model of an architecture transformers knows")
    model_type = _config_model_type(name)
    if model_type is not None and ("model type" in text or "architecture" in text or isinstance(exc, KeyError)):
        import transformers

        return (f"{name}: unknown model_type {model_type!r} (transformers {transformers.__version__} does not know "
                "it: a newer architecture, or custom code llmprune does not run)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"could not load {what} {name!r}: {first}"


def _config_model_type(name: str) -> str | None:
    path = Path(name)
    config = path if path.suffix == ".json" else path / "config.json"
    try:
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    from transformers import CONFIG_MAPPING

    return None if value in CONFIG_MAPPING else str(value)


#: Recipe entries naming a model (saved as its folder name or Hub id) and a text file or dataset (saved as
#: given when relative and inside the working folder, else as its file name).
_MODEL_KEYS = ("source_model", "model", "recovered_from", "teacher")
_TEXT_KEYS = ("calibration", "data", "training_data", "ppl")


def public_name(value: Any, keep_relative: bool = False) -> Any:
    """How a saved recipe and model card name a model or data file: a Hub id or dataset name as given, a local
    path by its name only (``keep_relative``: a relative path without ``..`` as given), never an absolute
    local path, which would leak the user's folders into every upload.

    Example::

        public_name("/home/me/models/ref-llama-7m")   # 'ref-llama-7m'
    """
    if not isinstance(value, str) or not value or value == "source":
        return value
    path = Path(value).expanduser()
    local = path.exists() or path.is_absolute() or value.startswith(("~", "."))
    if not local:
        return value  # Hub id or dataset name
    if keep_relative and not path.is_absolute() and ".." not in path.parts and not value.startswith("~"):
        return value
    return path.resolve().name if path.exists() else path.name


def public_recipe(entries: dict[str, Any]) -> dict[str, Any]:
    """``entries`` (a saved recipe's fields, or its ``run``) with every model and file named by
    :func:`public_name`; ``output`` is dropped (a downloaded folder must not choose where a rerun writes)."""
    out = dict(entries)
    for key in _MODEL_KEYS:
        if key in out:
            out[key] = public_name(out[key])
    for key in _TEXT_KEYS:
        if key in out:
            out[key] = public_name(out[key], keep_relative=True)
    if isinstance(out.get("prune"), dict) and out["prune"].get("vocab_text"):  # a run's PruneConfig names a text
        out["prune"] = {**out["prune"], "vocab_text": public_name(out["prune"]["vocab_text"], keep_relative=True)}
    if isinstance(out.get("run"), dict):
        out["run"] = public_recipe(out["run"])
        out["run"]["output"] = None
    return out


def drop_custom_code(folder: str | os.PathLike) -> list[str]:
    """Remove ``auto_map`` (custom code a config or tokenizer config names) from a saved folder's
    ``config.json`` and ``tokenizer_config.json``: llmprune never runs that code, does not copy it, and a saved
    folder must not point at code it does not hold. Returns the files changed, with a warning."""
    changed = []
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "auto_map" in data:
            del data["auto_map"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            changed.append(name)
    if changed:
        import sys

        print(f"llmprune: warning: the source's custom code (auto_map) is not used and not referenced by the output; "
              f"dropped from {', '.join(changed)}", file=sys.stderr)
    return changed


def _looks_like_hub_id(name: str) -> bool:
    import re

    return not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _model_card(source: str | None, cfg: PruneConfig | None, extra: dict[str, Any], needs_llmprune: bool) -> str:
    sparsity = extra.get("sparsity_config")
    tags = ["pruned", "llmprune"] + ([f"pruning-{cfg.method}"] if cfg else [])
    if isinstance(sparsity, dict):
        tags.append(f"sparsity-{sparsity.get('method')}")
    lines = ["---", "library_name: transformers"]
    if source and _looks_like_hub_id(source):  # the Hub rejects local paths as base_model
        lines.append(f"base_model: {source}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    what = "structurally pruned" if cfg is not None else "sparsified (weights set to zero, shapes unchanged)"
    lines += ["---", "", f"# Pruned {source or 'model'}", "",
              f"This model was {what} with [llmprune](https://github.com/llmprune/llmprune).", ""]
    for title, settings in (("pruning", cfg.to_dict() if cfg is not None else None),
                            ("sparsity", sparsity if isinstance(sparsity, dict) else None)):
        if settings:
            lines += [f"| {title} setting | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(settings.items())]
            lines.append("")
    scalars = {k: v for k, v in extra.items() if isinstance(v, (int, float, str)) or v is None}
    for k, v in scalars.items():
        lines.append(f"- {k}: {v}")
    if scalars:
        lines.append("")
    if needs_llmprune:
        lines += ["Its layers have different widths, so load it after `import llmprune` (which registers "
                  "llmprune's per-layer model classes with transformers):", "",
                  "```python", "import llmprune  # registers llmprune's per-layer model classes"]
    else:
        lines += ["It is a standard checkpoint: plain `transformers` loads it.", "", "```python"]
    lines += ["from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")", "```", ""]
    if isinstance(extra.get("activation_sparsity"), dict):
        lines += ["Dynamic activation sparsity (TEAL thresholds, stored in `llmprune_recipe.json`) is applied with:",
                  "", "```python", "from llmprune.sparsity import apply_activation_sparsity, read_activation_thresholds",
                  "apply_activation_sparsity(model, read_activation_thresholds(\"<this folder>\"))", "```", ""]
    return "\n".join(lines)


def save_pruned(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    config: PruneConfig | None = None,
    plan: PrunePlan | None = None,
    source: str | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    verify: bool = True,
) -> Path:
    """Save model (safetensors), tokenizer, recipe, plan and model card atomically into ``out_dir``.

    Before the folder is renamed into place it is reloaded and checked against ``model``
    (:func:`llmprune.checkpoint.verify.verify_saved_model`): with ``verify=True`` (default) outputs on a short batch
    must match; ``verify=False`` still checks every key and shape on the meta device. When ``plan`` pruned the
    vocabulary, ``tokenizer`` (the rewritten one) must fit the model and reload with the same ids
    (:func:`~llmprune.checkpoint.verify.verify_saved_tokenizer`). A failed check raises
    :class:`~llmprune.checkpoint.verify.VerificationError` and leaves nothing behind.
    """
    from .verify import verify_saved_model

    from .verify import verify_saved_tokenizer

    vocab_pruned = plan is not None and plan.kept_tokens is not None
    with atomic_directory(out_dir, overwrite, sources=[source]) as tmp:
        model.save_pretrained(tmp)
        verify_saved_model(model, tmp, full=verify)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            if vocab_pruned:  # a rewritten tokenizer: it must fit the model and reload with the same ids
                verify_saved_tokenizer(model, tokenizer, tmp)
        write_metadata(tmp, model, config=config, plan=plan, source=source, extra=extra)
    return Path(out_dir)


def write_metadata(folder: str | os.PathLike, model: nn.Module, config: PruneConfig | None = None,
                   plan: PrunePlan | None = None, source: str | None = None,
                   extra: dict[str, Any] | None = None) -> None:
    """Write the recipe, the plan (if any) and the model card of a saved model into ``folder``."""
    from ..core.version import __version__

    tmp = Path(folder)
    drop_custom_code(tmp)
    source = public_name(source)
    extra = public_recipe(dict(extra or {}))
    settings = config.to_dict() if config else None
    if settings and settings.get("vocab_text"):  # a data file: named like --calib, never by an absolute path
        settings["vocab_text"] = public_name(settings["vocab_text"], keep_relative=True)
    recipe = {
        "llmprune_recipe_version": RECIPE_VERSION,
        "llmprune_version": __version__,
        "source_model": source,
        "config": settings,
        **extra,
    }
    (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
    if plan is not None:
        (tmp / PLAN_FILE).write_text(plan.to_json())
    needs_llmprune = str(getattr(model.config, "model_type", "")).startswith("llmprune_")
    card_config = PruneConfig.from_dict(settings) if settings else None
    (tmp / "README.md").write_text(_model_card(source, card_config, extra, needs_llmprune))


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The saved recipe; its ``config`` entry round-trips through :class:`PruneConfig`."""
    data = json.loads((Path(path) / RECIPE_FILE).read_text())
    version = data.get("llmprune_recipe_version")
    if version is None or version > RECIPE_VERSION:
        raise ValueError(f"recipe version {version!r} is not supported by this llmprune (max {RECIPE_VERSION})")
    return data


def read_plan(path: str | os.PathLike) -> PrunePlan:
    return PrunePlan.from_json((Path(path) / PLAN_FILE).read_text())
