"""Reading checkpoints for a streamed run: the memory budget, the safetensors folder (:class:`Checkpoint`), the
model skeleton on the meta device."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..checkpoint.dispatched import ModelSource
from ..checkpoint.io import CheckpointError, read_safetensors_header
from ..core.memory import available_memory


class StreamingError(ValueError):
    """The run cannot be streamed (unsupported setting or checkpoint layout) or its saved state is unusable."""


# ---- memory budget ---------------------------------------------------------------------------------------
def parse_memory(text: str | int | None) -> int | None:
    """``"24GB"``, ``"512MiB"``, ``"2e9"`` or a byte count -> bytes."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
             "B": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 24GB or 512MiB") from None


def memory_budget(max_memory: int | None) -> int:
    """``max_memory``, or 80% of the available memory when not given."""
    return max_memory if max_memory is not None else int(0.8 * available_memory())


def checkpoint_bytes(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Bytes the model's weights take in memory (in ``dtype`` if given, else as stored)."""
    ck = Checkpoint(folder)
    if dtype is None:
        return ck.nbytes
    return sum(ck.numel(k) * torch.empty(0, dtype=dtype).element_size() for k in ck.files)


def should_stream(folder: str | os.PathLike, max_memory: int | None, dtype: torch.dtype | None = None) -> bool:
    """Whether a model would not fit the budget in memory: weights plus a working margin above ``max_memory``
    (default: 80% of the available memory)."""
    return int(1.3 * checkpoint_bytes(folder, dtype)) > memory_budget(max_memory)


# ---- the checkpoint on disk ------------------------------------------------------------------------------
def refuse_gguf(path: str | os.PathLike) -> None:
    """A clear :class:`CheckpointError` when ``path`` is a GGUF input (a ``.gguf`` file or a folder holding one):
    streaming reads safetensors shards one tensor at a time, which a GGUF file does not have."""
    from ..checkpoint.gguf_load import find_gguf

    if Path(path).exists() and find_gguf(path) is not None:
        raise CheckpointError(f"{path}: --streaming reads safetensors checkpoints, not GGUF; convert it first "
                              "(llmprune.load_model(path) then model.save_pretrained(folder) and "
                              "tokenizer.save_pretrained(folder), as scripts/real_model.py does), or prune "
                              "it in memory without --streaming")


class Checkpoint:
    """A local safetensors checkpoint (one file or an index of shards), read one tensor at a time."""

    execution_device: torch.device | None = None  # a folder has no placement: layers run where ``device`` says

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        refuse_gguf(self.folder)
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder} has no config.json: streaming needs a local model folder")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.folder / v for k, v in weight_map.items()}
            shards = sorted(set(self.files.values()))
        elif (self.folder / "model.safetensors").is_file():
            shards, self.files = [self.folder / "model.safetensors"], None
        else:
            raise CheckpointError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")
        self._meta: dict[str, tuple[list[int], str]] = {}
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard} is listed in the index but missing")
            for k, v in read_safetensors_header(shard).items():  # validated: a corrupt shard fails here
                self._meta[k] = (v["shape"], v["dtype"])
        if self.files is None:
            self.files = {k: shards[0] for k in self._meta}
        self.renames: list[tuple[str, str]] = []

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def numel(self, key: str) -> int:
        return math.prod(self._meta[key][0])

    @property
    def name(self) -> str:
        return str(self.folder)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must match: the folder and its shards' names and sizes."""
        return {"source": str(self.folder.absolute()),
                "files": sorted((p.name, p.stat().st_size) for p in set(self.files.values()))}

    def use_renames(self, renames: list[tuple[str, str]]) -> None:
        """Address tensors by model parameter name: stored ``embed_out.x`` is read as ``lm_head.x``."""
        self.renames = renames
        self._stored = {}
        for k in list(self.files):
            name = k
            for old, new in renames:
                if name.startswith(old):
                    name = new + name[len(old):]
            self._stored[name] = k
        self.files = {name: self.files[k] for name, k in self._stored.items()}
        self._meta = {name: self._meta[k] for name, k in self._stored.items() if k in self._meta}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (copied out of the memory-mapped shards, one shard open at a time)."""
        from safetensors import safe_open

        stored = getattr(self, "_stored", {})
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for shard, ks in by_file.items():
            with safe_open(str(shard), "pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(stored.get(k, k))
        return out


def key_renames(model: nn.Module) -> list[tuple[str, str]]:
    """``(checkpoint prefix, model prefix)`` pairs of the key renames transformers applies on load for this
    model (``GPTNeoXForCausalLM``: ``embed_out.`` -> ``lm_head.``) and reverses on save. Fusing or splitting
    conversions (batched MoE experts) cannot be read one tensor at a time: :class:`StreamingError`."""
    import re

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - transformers without conversion mappings
        return []
    out = []
    for key in (type(model).__name__, getattr(model.config, "model_type", "")):
        for conv in get_checkpoint_conversion_mapping(key) or []:
            if type(conv).__name__ != "WeightRenaming":
                raise StreamingError(f"{type(model).__name__} checkpoints are converted on load ({type(conv).__name__}); "
                                     "they cannot be streamed one tensor at a time; prune in memory")
            for src, tgt in zip(conv.source_patterns, conv.target_patterns):
                literal = src[1:].replace("\\.", ".")
                if not src.startswith("^") or not re.fullmatch(r"[\w.]+", literal):
                    raise StreamingError(f"{type(model).__name__}: key rename {src!r} -> {tgt!r} is not a prefix "
                                         "rename; prune in memory")
                out.append((literal, tgt))
    return out


def _resolve_dtype(config: Any, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype the in-memory loader would give (transformers 5: the config's ``dtype``, else float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    old = module._parameters.get(attr)
    module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)


def build_skeleton(source: str | os.PathLike | nn.Module, dtype: torch.dtype | str | None = None
                   ) -> tuple[nn.Module, Checkpoint | ModelSource, dict[int, str]]:
    """The model with its decoder layers on the meta device and every other weight read from ``source``:
    a checkpoint folder, or a loaded model (dispatched with accelerate or not; it is only read).

    Returns ``(model, source reader, {layer index: parameter-name prefix})``. Raises :class:`StreamingError`
    when the checkpoint's keys are not the model's parameter names (families whose loading renames keys).
    """
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(source, nn.Module):
        ck: Checkpoint | ModelSource = ModelSource(source)
        config = copy.deepcopy(source.config)
        dt = _resolve_dtype(config, dtype if dtype is not None else source.dtype)
        with init_empty_weights(include_buffers=False):  # the same class as the source, on meta
            model = type(source)._from_config(config, dtype=dt)
    else:
        ck = Checkpoint(source)
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
        dt = _resolve_dtype(config, dtype)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=dt, trust_remote_code=False)
    ck.use_renames(key_renames(model))
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = {i: names[id(layer)] + "." for i, layer in enumerate(adapter.decoder_layers(model))}
    in_layer = tuple(prefixes.values())
    expected = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    missing = [n for n in expected if n not in ck and not (n.startswith(in_layer) and n.endswith("bias"))]
    tied = _tied_head(model)
    missing = [n for n in missing if n != tied]
    if missing:
        raise StreamingError(f"{ck.name}: the checkpoint lacks {missing[0]!r} ({len(missing)} model parameters "
                             "are not stored under their own names); streaming reads checkpoints whose keys are "
                             "the model's parameter names (as save_pretrained writes them for Llama-style "
                             "families); prune this model without --streaming")
    rest = [n for n in expected if not n.startswith(in_layer) and n != tied]
    for name, t in ck.read(rest).items():
        _set_tensor(model, name, t.to(dt))
    if tied:
        model.tie_weights()
    model.eval()
    return model, ck, prefixes


def _tied_head(model: nn.Module) -> str | None:
    """Name of the output head's weight when it shares the input embedding (not stored in the file)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(cfg, "tie_word_embeddings", False):
        return None
    out = model.get_output_embeddings()
    if out is None:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(out)] + ".weight"
