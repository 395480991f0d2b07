"""Prune or sparsify a model larger than memory, one decoder layer at a time, resumably.

The in-memory path loads the whole model, prunes it and saves it. The streaming path never holds more
than one decoder layer's weights (plus the embeddings, the final norm and the LM head):

1. the model skeleton is built on the meta device (:func:`build_skeleton`); only the non-layer weights are
   read from the checkpoint (a folder, :class:`Checkpoint`, or a loaded model dispatched with accelerate's
   ``device_map`` / ``cpu_offload``, :class:`llmprune.dispatched.ModelSource`, which is only read);
2. every layer-by-layer pass of the in-memory path (:func:`llmprune.calibrate.layerwise_statistics`,
   :func:`llmprune.sequential.prune_sequential`, the sparsity loop) runs unchanged with a
   :class:`LayerStream` as its :class:`~llmprune.calibrate.LayerIO`: on ``enter`` the layer's tensors are
   read from the safetensors shards, on ``leave`` the pruned layer is written to its own output shard
   (read back and compared bit for bit), freed back to the meta device, and the hidden states that feed the
   next layer are saved as the resume point;
3. structured pruning that needs every layer's scores first (global, ``error`` and ``block_influence``
   allocations) runs a streamed scoring pass first, then a streamed cutting pass;
4. the config, tokenizer, recipe, plan, model card and shard index are written, the key set and shapes are
   checked with the loader a user would use (on the meta device), and the folder is renamed into place.

Because the passes are the in-memory passes, the saved tensors are bit-identical to the in-memory output.

A run's state lives in ``.<out>.partial/`` next to the output (finished layers' shards, the hidden states
entering the next layer, the scoring pass's per-layer results, ``stream_state.json``); ``resume=True``
continues a killed run from the last finished layer, refusing state written for other settings.

Example::

    result = prune_streaming("llama-70b/", PruneConfig(heads=0.25, ffn=0.25), "out/", calibration="c4")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..arch import get_adapter
from ..calibration.calibrate import CalibrationError, LayerIO, as_batches, layerwise_statistics
from ..core.config import LayerPlan, PruneConfig, PrunePlan
from ..checkpoint.dispatched import ModelSource
from ..checkpoint.io import CheckpointError, OutputExistsError, read_safetensors_header, replace_directory, write_metadata
from ..core.memory import available_memory, release_freed_memory

__all__ = ["StreamingError", "Checkpoint", "build_skeleton", "LayerStream", "prune_streaming",
           "sparsify_streaming", "StreamResult", "checkpoint_bytes", "available_memory", "memory_budget", "parse_memory",
           "should_stream"]

STATE_FILE = "stream_state.json"
STATE_VERSION = 1


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
class Checkpoint:
    """A local safetensors checkpoint (one file or an index of shards), read one tensor at a time."""

    execution_device: torch.device | None = None  # a folder has no placement: layers run where ``device`` says

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
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


# ---- the run's folder: shards, state, resume point -------------------------------------------------------
class PartialOutput:
    """``.<out>.partial/`` next to the output: created fresh, or reopened by ``resume`` when its state
    was written for the same ``fingerprint``."""

    def __init__(self, out: str | os.PathLike, fingerprint: str, resume: bool, overwrite: bool):
        self.out = Path(out).absolute()
        self.dir = self.out.with_name(f".{self.out.name}.partial")
        if self.out.exists() and not overwrite:
            raise OutputExistsError(f"output directory {self.out} already exists; pass --overwrite (overwrite=True) "
                                    "to replace it")
        self.overwrite = overwrite
        self.state: dict[str, Any] = {}
        if resume and (self.dir / STATE_FILE).is_file():
            state = json.loads((self.dir / STATE_FILE).read_text())
            if state.get("fingerprint") != fingerprint:
                raise StreamingError(f"{self.dir} holds an interrupted run with other settings (model, config or "
                                     "calibration data differ); rerun without --resume to start over")
            self.state = state
        else:  # a fresh run (also --resume with nothing saved yet)
            if (self.dir / STATE_FILE).is_file() and not overwrite and not resume:
                raise OutputExistsError(f"{self.dir} holds an interrupted run: pass --resume (resume=True) to "
                                        "continue it, or --overwrite to start over")
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self.state = {"version": STATE_VERSION, "fingerprint": fingerprint}
            self.save_state()
        (self.dir / "layers").mkdir(exist_ok=True)

    def save_state(self) -> None:
        tmp = self.dir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / STATE_FILE)  # atomic: a kill leaves the old or the new state

    def finish(self, keep: Callable[[Path], bool]) -> Path:
        """Remove the state files and rename the folder into place."""
        for p in list(self.dir.iterdir()):
            if not keep(p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        replace_directory(self.dir, self.out)
        return self.out


def _save_hidden(folder: Path, tag: str, hidden: list[torch.Tensor]) -> dict[str, Any]:
    """Write hidden states as one raw file (read back memory-mapped); returns its description."""
    path = folder / f"hidden-{tag}.bin"
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for h in hidden:
            f.write(h.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "shapes": [list(h.shape) for h in hidden], "dtype": str(hidden[0].dtype).split(".")[-1]}


def _load_hidden(folder: Path, desc: dict[str, Any], mapped: bool) -> list[torch.Tensor]:
    dtype = getattr(torch, desc["dtype"])
    shapes = desc["shapes"]
    total = sum(math.prod(s) for s in shapes)
    flat = torch.from_file(str(folder / desc["file"]), shared=False, size=total, dtype=dtype)
    if not mapped:
        flat = flat.clone()  # into memory: the file may be replaced by the next layer's states
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[at: at + n].view(*s))
        at += n
    return out


def _hidden_bytes(hidden: list[torch.Tensor]) -> int:
    return sum(h.numel() * h.element_size() for h in hidden)


# ---- one layer in, one layer out ---------------------------------------------------------------------------
class LayerStream(LayerIO):
    """Loads a decoder layer's weights on ``enter``; on ``leave``, optionally writes the (pruned) layer,
    frees it and saves the hidden states that feed the next layer as the pass's resume point.

    Args:
        phase: the state key of this pass (``"score"``, ``"cut"``, ``"sparsify"``).
        write: write each finished layer as an output shard.
        on_leave: called with ``(i, layer)`` before the layer is written and freed (reports, plans).
        spill_bytes: hidden states above this size stay memory-mapped from the run folder instead of RAM.
        read_output: read every layer from this run's output shards (written by an earlier pass) instead of
            the source checkpoint.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, prefixes: dict[int, str], part: PartialOutput,
                 phase: str, write: bool, dtype: torch.dtype, spill_bytes: int,
                 on_leave: Callable[[int, nn.Module], None] | None = None,
                 out_index: Callable[[int], int] | None = None, read_output: bool = False):
        self.model, self.ck, self.prefixes, self.part = model, checkpoint, prefixes, part
        self.phase, self.write, self.dtype, self.spill_bytes = phase, write, dtype, spill_bytes
        self.read_output = read_output
        self.on_leave = on_leave
        self.out_index = out_index or (lambda i: i)
        self.layers = get_adapter(model).decoder_layers(model)
        self.plans: dict[int, LayerPlan] = {}
        st = part.state.get(phase, {})
        self.start = int(st.get("next", 0))
        for i, lp in st.get("plans", {}).items():
            self.plans[int(i)] = LayerPlan(**lp)
        self.loaded: set[int] = set()

    # materialise / free ---------------------------------------------------------------------------------
    def load(self, i: int) -> None:
        if i in self.loaded:
            return
        layer, prefix = self.layers[i], self.prefixes[i]
        metas = [(n, p) for n, p in layer.named_parameters() if p.device.type == "meta"]
        written = self._written(i)
        if written is not None:  # resumed: a finished layer (the capture pass probes layer 0) is read back
            from safetensors.torch import load_file

            out_prefix = self._out_prefix(i)
            tensors = {prefix + k[len(out_prefix):]: v for k, v in load_file(str(written)).items()}
        else:
            tensors = self.ck.read([prefix + n for n, _ in metas if prefix + n in self.ck])
        for n, p in metas:
            t = tensors.get(prefix + n)
            if t is None:  # a bias llmprune added (bias compensation): starts at zero, as in memory
                t = torch.zeros(p.shape)
            if tuple(t.shape) != tuple(p.shape):  # resumed run: this layer is already cut on the meta device
                raise StreamingError(f"{prefix + n}: checkpoint shape {tuple(t.shape)} != model shape {tuple(p.shape)}")
            _set_tensor(layer, n, t.to(self.dtype))
        self.loaded.add(i)

    def _written(self, i: int) -> Path | None:
        path = self.part.dir / "layers" / f"layer-{self.out_index(i):05d}.safetensors"
        if self.read_output:
            if not path.is_file():
                raise StreamingError(f"{path} is missing: the pass that writes layer {i} has not finished")
            return path
        return path if self.write and i < self.start and path.is_file() else None

    def _out_prefix(self, i: int) -> str:
        prefix, j = self.prefixes[i], self.out_index(i)
        return prefix if j == i else prefix[: -len(f"{i}.")] + f"{j}."

    def free(self, i: int) -> None:
        layer = self.layers[i]
        for n, p in list(layer.named_parameters()):
            _set_tensor(layer, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        self.loaded.discard(i)
        release_freed_memory()  # else glibc keeps the freed layer's pages: RSS would grow with every layer

    # LayerIO ----------------------------------------------------------------------------------------------
    def initial_hidden(self, captured: list[torch.Tensor]) -> list[torch.Tensor]:
        if 0 in self.loaded and self.start > 0:
            self.free(0)  # loaded only for the capture pass's probe
        desc = self.part.state.get(self.phase, {}).get("hidden")
        if self.start == 0 or desc is None:
            return captured
        return _load_hidden(self.part.dir, desc, mapped=self.spill_bytes < _bytes_of(desc))

    def enter(self, i: int, layer: nn.Module) -> None:
        self.load(i)

    def leave(self, i: int, layer: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.on_leave is not None:
            self.on_leave(i, layer)
        if self.write:
            self.write_layer(i)
        self.free(i)
        last = i + 1 >= len(self.layers)
        st = self.part.state.setdefault(self.phase, {})
        old = st.get("hidden")
        if not last and hidden:
            st["hidden"] = _save_hidden(self.part.dir, f"{self.phase}-{i % 2}", hidden)
        st["next"] = i + 1
        if i in self.plans:
            st.setdefault("plans", {})[str(i)] = self.plans[i].to_dict()
        self.part.save_state()
        if old is not None and (last or old["file"] != st["hidden"]["file"]):
            (self.part.dir / old["file"]).unlink(missing_ok=True)
        if not last and hidden and _hidden_bytes(hidden) > self.spill_bytes:  # spill: keep them on disk, mapped
            return _load_hidden(self.part.dir, st["hidden"], mapped=True)
        return hidden

    def write_layer(self, i: int) -> None:
        """Write layer ``i`` (under its output index), read it back and compare bit for bit."""
        from safetensors.torch import load_file, save_file

        layer = self.layers[i]
        prefix, j = self._out_prefix(i), self.out_index(i)
        tensors = _stored_names({prefix + n: p.detach().contiguous().cpu() for n, p in layer.named_parameters()},
                                self.ck.renames)
        path = self.part.dir / "layers" / f"layer-{j:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        back = load_file(str(tmp))
        bad = [k for k, t in tensors.items() if k not in back or not torch.equal(back[k], t)]
        if bad or len(back) != len(tensors):
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{path.name}: written tensors do not read back identically ({bad[:1]})")
        os.replace(tmp, path)


def _stored_names(tensors: dict[str, torch.Tensor], renames: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Model names -> the names save_pretrained writes (the load renames reversed)."""
    out = {}
    for name, t in tensors.items():
        for old, new in renames:
            if name.startswith(new):
                name = old + name[len(new):]
        out[name] = t
    return out


def _bytes_of(desc: dict[str, Any]) -> int:
    size = torch.empty(0, dtype=getattr(torch, desc["dtype"])).element_size()
    return sum(math.prod(s) for s in desc["shapes"]) * size


# ---- finishing: shards, index, config, metadata ----------------------------------------------------------
def _finish(model: nn.Module, part: PartialOutput, prefixes: dict[int, str], ck: Checkpoint | ModelSource,
            tokenizer: Any, metadata: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from ..checkpoint.verify import verify_saved_model

    tied = _tied_head(model)
    in_layer = tuple(prefixes.values())
    rest = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if not n.startswith(in_layer) and n != tied and p.device.type != "meta"}
    save_file(_stored_names(rest, key_renames(model)), str(part.dir / "layers" / "rest.safetensors"),
              metadata={"format": "pt"})
    shards = sorted((part.dir / "layers").glob("layer-*.safetensors")) + [part.dir / "layers" / "rest.safetensors"]
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.replace(shard, part.dir / name)
        for key, v in read_safetensors_header(part.dir / name).items():
            weight_map[key] = name
            total += v["data_offsets"][1] - v["data_offsets"][0]  # the tensor's bytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (part.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(part.dir)
    _save_generation_config(ck, part.dir)
    if tokenizer is None and isinstance(ck, Checkpoint):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ck.folder), trust_remote_code=False)
        except (OSError, ValueError):
            pass  # a checkpoint without a tokenizer: the weights are what matters
    if tokenizer is not None:
        tokenizer.save_pretrained(part.dir)
    write_metadata(part.dir, model, **metadata)
    verify_saved_model(model, part.dir, full=False)  # key set and shapes, with the user's loader, on meta
    keep_names = {"layers", STATE_FILE}
    return part.finish(lambda p: p.name not in keep_names and not p.name.startswith("hidden-")
                       and not p.name.startswith("score-"))


def _save_generation_config(ck: Checkpoint | ModelSource, folder: Path) -> None:
    """The source's generation settings, as save_pretrained would keep them."""
    if isinstance(ck, Checkpoint):
        if (ck.folder / "generation_config.json").is_file():
            shutil.copyfile(ck.folder / "generation_config.json", folder / "generation_config.json")
    elif getattr(ck.model, "generation_config", None) is not None:
        ck.model.generation_config.save_pretrained(folder)


def _fingerprint(ck: Checkpoint | ModelSource, settings: dict[str, Any], batches: list[torch.Tensor] | None,
                 dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({**ck.identity(), "settings": settings, "dtype": str(dtype)}, sort_keys=True).encode())
    for b in batches or []:
        h.update(b.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class StreamResult:
    out: Path
    plan: PrunePlan | None
    params_before: int
    params_after: int
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)


def _count(model: nn.Module) -> int:
    from ..structured.pipeline import count_parameters

    return count_parameters(model)


# ---- structured pruning ------------------------------------------------------------------------------------
def prune_streaming(source: str | os.PathLike | nn.Module, config: PruneConfig, out: str | os.PathLike,
                    tokenizer: Any = None, calibration: Any = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, resume: bool = False, overwrite: bool = False,
                    max_memory: int | None = None, progress: bool = True,
                    extra: dict[str, Any] | None = None) -> StreamResult:
    """Structured pruning of ``source`` into the checkpoint folder ``out``, one layer in memory at a time.

    ``source`` is a checkpoint folder, or a loaded model, typically one dispatched with accelerate
    (``device_map`` with ``"cpu"`` / ``"disk"`` entries, ``cpu_offload``): its weights are read one layer at a
    time from its parameters and offload hooks (:class:`llmprune.dispatched.ModelSource`) and the model is
    left unchanged; layers run on its hooks' execution device unless ``device`` is given.
    The same settings as :func:`llmprune.prune` (``error`` / ``block_influence`` / ``global`` allocations,
    ``reconstruct``, bias compensation) give the same tensors. Not streamed (clear error): criteria with
    their own gradient pass (``taylor``, ``single-unit``), layer removal and MoE experts.
    """
    import time

    from ..criteria import get_criterion
    from ..structured.select import check_ratios

    t0 = time.perf_counter()
    config.validate()
    criterion = get_criterion(config.method)
    if criterion.prepare is not None:
        raise StreamingError(f"method {config.method!r} takes gradients through the whole model; it cannot be "
                             "streamed layer by layer (use wanda, flap or magnitude, or prune in memory)")
    if config.layers or config.experts:
        raise StreamingError("layer and expert removal are not streamed yet; prune in memory")
    model, ck, prefixes = build_skeleton(source, dtype)
    device = device if device is not None else ck.execution_device
    adapter = get_adapter(model)
    if any(adapter.experts(layer) is not None for layer in adapter.decoder_layers(model)):
        raise StreamingError("mixture-of-experts models are not streamed yet; prune in memory")
    dt = next(p for p in model.parameters() if p.device.type != "meta").dtype
    check_ratios(model, adapter, config)
    prunes_units = config.heads > 0 or config.ffn > 0
    needs_data = (criterion.needs_calibration or config.bias_compensation or config.reconstruct
                  or config.allocation in ("error", "block_influence")) and prunes_units
    batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
    if needs_data and batches is None:
        raise CalibrationError(f"method {config.method!r} with these settings needs calibration data: pass "
                               "calibration=<text file> (CLI: --calib FILE)")
    params_before = _count(model)
    part = PartialOutput(out, _fingerprint(ck, {"prune": config.to_dict()}, batches, dt), resume,
                         overwrite)
    _announce(ck, len(adapter.decoder_layers(model)), max_memory, batches if needs_data else None, model,
              progress)
    spill = _spill_bytes(max_memory)
    stream = lambda phase, write, on_leave=None: LayerStream(model, ck, prefixes, part, phase, write, dt, spill,
                                                             on_leave)
    layers = adapter.decoder_layers(model)
    reconstruct = config.reconstruct and prunes_units
    first_pass = not (reconstruct and config.allocation == "uniform")
    plan = None
    if first_pass:
        plan = _scoring_pass(model, adapter, config, batches if needs_data else None, stream, part, device,
                             progress, prunes_units)
    from ..structured.perlayer import set_config_widths

    if reconstruct:
        from ..structured.compensate import enable_biases, zero_deltas
        from ..structured.sequential import prune_sequential
        from ..structured.surgery import prune_layer

        if config.bias_compensation:
            enable_biases(adapter, model, zero_deltas(adapter, model))
        io = stream("cut", True)
        for i, lp in io.plans.items():  # resumed: finished layers take their cut shapes on the meta device
            prune_layer(adapter, layers[i], lp)
        plan = prune_sequential(model, adapter, config, batches, plan, device=device, progress=progress,
                                layer_io=io)
    else:
        plan = _cutting_pass(model, adapter, config, plan, stream, part, progress)
        set_config_widths(model, adapter)
    params_after = _count(model)
    meta = dict(config=config, plan=plan, source=ck.name,
                extra={"params_before": params_before, "params_after": params_after, "streamed": True,
                       **(extra or {})})
    path = _finish(model, part, prefixes, ck, tokenizer, meta)
    return StreamResult(path, plan, params_before, params_after, time.perf_counter() - t0)


def _announce(ck: Checkpoint | ModelSource, n_layers: int, max_memory: int | None, batches: Any, model: nn.Module,
              progress: bool) -> None:
    """One line before the per-layer progress bars: what is streamed and the memory budget."""
    if not progress:
        return
    budget = memory_budget(max_memory)
    hidden = 0
    if batches:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        width = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
        size = next(p for p in model.parameters() if p.device.type != "meta").element_size()
        hidden = sum(b.numel() for b in batches) * width * size
    where = "spilled to disk" if 2 * hidden > _spill_bytes(max_memory) else "in memory"
    print(f"llmprune: streaming {Path(ck.name).name}: {n_layers} layers, weights {ck.nbytes / 1e9:.2f} GB, "
          f"memory budget {budget / 1e9:.2f} GB, calibration states {hidden / 1e6:.0f} MB ({where})", flush=True)


def _spill_bytes(max_memory: int | None) -> int:
    """Hidden states larger than a quarter of the budget are memory-mapped from the run folder."""
    return memory_budget(max_memory) // 4


def _scoring_pass(model, adapter, config, batches, stream, part, device, progress, prunes_units) -> PrunePlan:
    """Pass 1: every layer's scores (and cost curves / Block Influence / compensation means) are computed
    while it is loaded and kept on disk (the resume point); then the plan is made as in memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..core.allocate import CostCurve
    from ..calibration.calibrate import LayerStats
    from ..structured.score import LayerScores, score_layer
    from ..structured.select import plan_pruning
    from ..structured.sequential import block_influence_counts, error_counts, layer_cost_curves, output_modules

    error_alloc = config.allocation == "error" and prunes_units
    n = len(adapter.decoder_layers(model))

    def save(i: int, layer: nn.Module, stats: LayerStats | None) -> None:
        s = score_layer(adapter, layer, config, stats)
        tensors = {f: getattr(s, f).contiguous() for f in ("q_heads", "kv_heads", "neurons", "expert_neurons",
                                                            "experts") if getattr(s, f) is not None}
        meta = {"group_size": s.group_size, "block_influence": s.block_influence,
                "stats_block_influence": stats.block_influence if stats is not None else None}
        if error_alloc:
            curves = layer_cost_curves(adapter, layer, config, s, stats)
            meta["curves"] = [None if c is None else {"unit_params": c.unit_params, "cost": c.cost} for c in curves]
            stats.grams.clear()
        if config.bias_compensation and stats is not None:  # means of the output projections' inputs
            for k, m in enumerate(output_modules(adapter, layer)):
                tensors[f"mean.{k}"] = stats.inputs[m].mean.contiguous()
        save_file(tensors, str(part.dir / f"score-{i:05d}.safetensors"), metadata={"json": json.dumps(meta)})

    if batches is not None:
        io = stream("score", False)
        if io.start < n:
            layerwise_statistics(model, adapter, batches, device=device, progress=progress,
                                 on_layer=lambda i, layer, st: save(i, layer, st), rerun=False, layer_io=io,
                                 grams_of=(lambda layer: output_modules(adapter, layer)) if error_alloc else None)
    else:
        io = stream("score", False, lambda i, layer: save(i, layer, None))
        for i in range(io.start, n):  # no data: scores from the weights alone
            io.enter(i, io.layers[i])
            io.leave(i, io.layers[i], [])
    scores, curves, block_influence, means = [], [], [], []
    for i in range(n):
        with safe_open(str(part.dir / f"score-{i:05d}.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["json"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        scores.append(LayerScores(q_heads=t.get("q_heads"), kv_heads=t.get("kv_heads"), neurons=t.get("neurons"),
                                  expert_neurons=t.get("expert_neurons"), experts=t.get("experts"),
                                  group_size=meta["group_size"], block_influence=meta["block_influence"]))
        block_influence.append(meta["stats_block_influence"])
        if error_alloc:
            curves.append(tuple(None if c is None else CostCurve(c["unit_params"], c["cost"]) for c in meta["curves"]))
        means.append([t[k] for k in sorted(k for k in t if k.startswith("mean."))])
    counts = None
    if error_alloc:
        counts = error_counts(model, adapter, config, curves)
    elif config.allocation == "block_influence" and prunes_units:
        counts = block_influence_counts(model, adapter, config, block_influence)
    plan = plan_pruning(model, adapter, config, scores, counts)
    part.compensation_means = means  # type: ignore[attr-defined]
    return plan


def _cutting_pass(model, adapter, config, plan, stream, part, progress) -> PrunePlan:
    """Pass 2 without reconstruction: load, compensate, cut, write, free (no calibration needed)."""
    from ..calibration.calibrate import InputStats, LayerStats
    from ..structured.compensate import Delta, add_deltas, enable_biases, layer_deltas
    from ..core.progress import progress_bar
    from ..structured.sequential import output_modules
    from ..structured.surgery import prune_layer

    layers = adapter.decoder_layers(model)
    if config.bias_compensation:  # shapes only: which projections need a bias the checkpoint lacks
        placeholders = []
        for layer, lp in zip(layers, plan.layers):
            for kind, spec, kept in (("attention", adapter.attention(layer), lp.kept_heads),
                                     ("ffn", adapter.ffn(layer), lp.kept_neurons)):
                if spec is not None and kept is not None:
                    placeholders.append(Delta(spec.output.module, kind, torch.zeros(0)))
        enable_biases(adapter, model, placeholders)

    def cut(i: int, layer: nn.Module) -> None:
        deltas = []
        if config.bias_compensation:
            stats = LayerStats()
            for m, mean in zip(output_modules(adapter, layer), part.compensation_means[i]):
                stats.inputs[m] = InputStats(count=1, sum=mean)
            deltas = layer_deltas(adapter, layer, plan.layers[i], stats)
        with torch.no_grad():
            prune_layer(adapter, layer, plan.layers[i])
        add_deltas(deltas)

    io = stream("cut", True, cut)
    for i in range(io.start):
        with torch.no_grad():
            prune_layer(adapter, layers[i], plan.layers[i])  # meta: finished layers' shapes
    for i in progress_bar(range(io.start, len(layers)), desc="cutting layers", disable=not progress,
                          total=len(layers), initial=io.start):
        io.enter(i, layers[i])
        io.leave(i, layers[i], [])
    return plan


# ---- weight sparsity ---------------------------------------------------------------------------------------
def sparsify_streaming(source: str | os.PathLike | nn.Module, config: Any, out: str | os.PathLike,
                       tokenizer: Any = None, calibration: Any = None, device: str | torch.device | None = None,
                       dtype: torch.dtype | str | None = None, resume: bool = False, overwrite: bool = False,
                       max_memory: int | None = None, progress: bool = True,
                       extra: dict[str, Any] | None = None, activation_sparsity: float = 0.0) -> StreamResult:
    """Weight sparsity (:func:`llmprune.sparsity.sparsify`) of ``source`` (a checkpoint folder or a loaded,
    possibly dispatched model, as in :func:`prune_streaming`) into ``out``, one layer at a time; the same
    tensors as in memory. OWL allocation is not streamed (it needs every layer's outliers first).

    ``activation_sparsity`` > 0: a second streamed pass over the sparsified layers calibrates TEAL thresholds
    (:func:`llmprune.sparsity.calibrate_activation_thresholds` on the same calibration windows and targets:
    the thresholds of the in-memory sparsified model), stored with the output as ``sparsify --activation-sparsity``
    stores them and returned in ``report["activation_sparsity"]``."""
    import time

    from ..sparsity._common import layer_targets
    from ..sparsity.api import SparsityConfig, _NEEDS_DATA, _prune_module, _sequential

    t0 = time.perf_counter()
    config = SparsityConfig.from_dict(config) if isinstance(config, dict) else config
    config.validate()
    if config.allocation != "uniform":
        raise StreamingError(f"allocation {config.allocation!r} is not streamed yet; use uniform or sparsify in memory")
    model, ck, prefixes = build_skeleton(source, dtype)
    device = device if device is not None else ck.execution_device
    adapter = get_adapter(model)
    dt = next(p for p in model.parameters() if p.device.type != "meta").dtype
    layers = adapter.decoder_layers(model)
    targets = layer_targets(model, layers, config.targets)
    if not any(targets):
        raise ValueError(f"targets={config.targets} match no linear layer inside the decoder blocks")
    if isinstance(activation_sparsity, bool) or not 0.0 <= float(activation_sparsity) < 1.0:
        raise ValueError(f"activation_sparsity={activation_sparsity!r} must be a fraction in [0, 1)")
    batches = None
    if config.needs_calibration or activation_sparsity > 0:
        batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
        if batches is None:
            needs = f"method {config.method!r}" if config.needs_calibration else "activation sparsity"
            raise CalibrationError(f"{needs} needs calibration data: pass calibration=<text file>")
    settings: dict[str, Any] = {"sparsify": config.to_dict()}
    if activation_sparsity > 0:
        settings["activation_sparsity"] = float(activation_sparsity)
    part = PartialOutput(out, _fingerprint(ck, settings, batches, dt), resume, overwrite)
    _announce(ck, len(layers), max_memory, batches, model, progress)
    report = part.state.setdefault("report", {})

    def count(i: int, layer: nn.Module) -> None:
        for name, mod in targets[i]:
            w = mod.weight
            report[name] = [int((w == 0).sum()), w.numel()]

    io = LayerStream(model, ck, prefixes, part, "sparsify", True, dt, _spill_bytes(max_memory), count)
    if config.sparsity > 0 and config.method in _NEEDS_DATA:
        if io.start < len(layers):
            _sequential(model, adapter, layers, targets, batches, config, progress, device,
                        [config.sparsity] * len(layers), layer_io=io)
    else:
        for i in range(io.start, len(layers)):
            io.enter(i, layers[i])
            if config.sparsity > 0:
                for _, mod in targets[i]:
                    _prune_module(mod, config, None, config.sparsity)
            io.leave(i, layers[i], [])
    zeros = sum(z for z, _ in report.values())
    total = sum(t for _, t in report.values())
    summary = {"config": config.to_dict(), "layers": {k: z / max(t, 1) for k, (z, t) in report.items()},
               "overall_sparsity": zeros / max(total, 1), "pruned_weights": zeros, "total_weights": total}
    act_extra = {}
    if activation_sparsity > 0:
        thresholds = _activation_pass(model, ck, prefixes, part, dt, max_memory, batches, float(activation_sparsity),
                                      config.targets, device, progress)
        summary["activation_sparsity"] = act_extra["activation_sparsity"] = {
            "target": float(activation_sparsity), "thresholds": thresholds}
    params = _count(model)
    meta = dict(config=None, plan=None, source=ck.name,
                extra={"sparsity_config": config.to_dict(), "overall_sparsity": summary["overall_sparsity"],
                       "streamed": True, **act_extra, **(extra or {})})
    path = _finish(model, part, prefixes, ck, tokenizer, meta)
    return StreamResult(path, None, params, params, time.perf_counter() - t0, summary)


def _activation_pass(model: nn.Module, ck: Checkpoint | ModelSource, prefixes: dict[int, str], part: PartialOutput,
                     dtype: torch.dtype, max_memory: int | None, batches: list[torch.Tensor], sparsity: float,
                     targets: list[str], device: Any, progress: bool) -> dict[str, float]:
    """TEAL thresholds of the layers the weight pass wrote, read back one at a time (resumable: finished
    layers' thresholds are kept in the run's state)."""
    from ..sparsity.activation import calibrate_activation_thresholds

    saved = part.state.setdefault("activation", {}).setdefault("thresholds", {})
    io = LayerStream(model, ck, prefixes, part, "activation", False, dtype, _spill_bytes(max_memory), read_output=True)
    if io.start < len(io.layers):
        calibrate_activation_thresholds(model, calibration=batches, sparsity=sparsity, targets=targets,
                                        progress=progress, device=device, max_memory=max_memory, layer_io=io,
                                        on_layer=lambda i, th: saved.update(th))
    return dict(saved)
