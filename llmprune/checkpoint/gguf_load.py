"""Reading GGUF files as a pruning source: finding the file a path names, checking its magic and header, and
loading it through transformers' reader, dequantised, without the quantizer (so every save is plain safetensors).

Example::

    model, tok = load_gguf(find_gguf("SmolLM2-135M-Instruct.Q4_1.gguf"), dtype=None, device=None, with_tokenizer=True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["find_gguf", "check_gguf", "load_gguf", "strip_quantizer"]


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file that ``path`` names: the file itself, or the single ``.gguf`` in a folder that has no
    ``config.json`` (a Hugging Face folder always wins). ``None`` when ``path`` is not a GGUF input."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(p.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{p} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); pass one file")
    return found[0] if found else None


def check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")


def _gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read with the ``gguf`` package, which also checks that every
    tensor fits the file: a truncated or corrupt file is one :class:`CheckpointError` line here."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise CheckpointError(f"{path}: GGUF file without general.architecture") from None
    except Exception as exc:  # struct / numpy errors of a short or damaged file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({msg})") from None


def strip_quantizer(model: nn.Module) -> nn.Module:
    """Forget how ``model`` was loaded (GGUF dequantisation): without this ``save_pretrained`` refuses the
    model, and a saved ``config.json`` would carry a ``quantization_config`` that points at the GGUF file.
    The weights are already plain dequantised tensors."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            setattr(model, name, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


def load_gguf(path: Path, dtype: Any, device: Any, with_tokenizer: bool) -> tuple[nn.Module, Any]:
    """A GGUF file dequantised into ``dtype`` (float32 by default: GGUF blocks are not a torch dtype) by
    transformers' own reader; the ``gguf`` package must be installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        import gguf  # noqa: F401  (transformers needs it; a clear line beats its import error)
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package: pip install gguf") from None
    architecture = _gguf_architecture(path)
    if dtype is None or dtype == "auto":
        dtype = torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False, use_kernels=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "architecture" in msg.lower() or isinstance(exc, KeyError):
            raise CheckpointError(f"{path}: unsupported GGUF architecture {architecture!r} (transformers: {msg}); "
                                  "convert it to a Hugging Face safetensors folder first") from exc
        raise CheckpointError(f"could not load GGUF file {path} (architecture {architecture!r}): {msg}") from exc
    strip_quantizer(model)
    model.config.name_or_path = str(path)
    if device is not None:
        model.to(device)
    tokenizer = None
    if with_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    return model, tokenizer
