"""The layer stream: one decoder layer's weights read in, the pruned layer written to its shard and freed."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..arch import get_adapter
from ..calibration.calibrate import LayerIO
from ..core.config import LayerPlan
from ..checkpoint.io import CheckpointError
from ..core.memory import release_freed_memory
from .source import Checkpoint, _set_tensor, StreamingError
from .resume import _hidden_bytes, _load_hidden, PartialOutput, _save_hidden


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
        self.records.update({int(i): r for i, r in st.get("records", {}).items()})
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

    def release(self, i: int, layer: nn.Module) -> None:
        self.free(i)

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
        if i in self.records:
            st.setdefault("records", {})[str(i)] = self.records[i]
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
