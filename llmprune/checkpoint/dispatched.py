"""Models dispatched with accelerate (``from_pretrained(device_map=...)`` with ``"cpu"`` / ``"disk"`` entries,
``accelerate.dispatch_model``, ``accelerate.cpu_offload``): their weights read one tensor at a time.

An offloaded parameter lives on the ``meta`` device; the real tensor sits in the ``weights_map`` of the
``AlignDevicesHook`` that loads it for each forward (a dict in memory, or safetensors / ``.dat`` files in
the offload folder). :class:`ModelSource` reads parameters from there, or from the parameter itself where it
is not offloaded, with :class:`llmprune.streaming.Checkpoint`'s interface, so the streaming passes
(:func:`llmprune.streaming.prune_streaming`, :func:`~llmprune.streaming.sparsify_streaming`) take a
dispatched model as their source: one decoder layer materialised at a time, the dispatched model left as it
was, the pruned checkpoint written to a folder.

:func:`llmprune.prune` and :func:`llmprune.sparsity.sparsify` edit weights in place and cannot reach
offloaded ones; :func:`check_not_dispatched` makes them say so and name the streaming call instead.

Example::

    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder="offload/")
    prune_streaming(model, PruneConfig(heads=0.25, ffn=0.25), "pruned/", tokenizer=tok, calibration="c4")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["DispatchedModelError", "ModelSource", "offloaded_parameters", "is_dispatched", "check_not_dispatched"]


class DispatchedModelError(ValueError):
    """A dispatched model was given where its weights must be edited in place, or its offloaded weights
    cannot be found."""


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def _offload_hook(module: nn.Module) -> Any:
    """The accelerate hook on ``module`` that holds offloaded weights (``AlignDevicesHook(offload=True)``), or
    None."""
    return next((h for h in _hooks(module) if getattr(h, "offload", False)
                 and getattr(h, "weights_map", None) is not None), None)


def offloaded_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters whose values are not in the module (on the ``meta`` device)."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]


def _devices(model: nn.Module) -> list[str]:
    """The distinct devices of ``hf_device_map`` (accelerate's ``0`` and ``"cuda:0"`` are one)."""
    return sorted({f"cuda:{d}" if isinstance(d, int) else str(d)
                   for d in (getattr(model, "hf_device_map", None) or {}).values()})


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate spread the model over several devices or offloaded any of its weights."""
    return len(_devices(model)) > 1 or bool(offloaded_parameters(model))


def check_not_dispatched(model: nn.Module, verb: str) -> None:
    """Raise :class:`DispatchedModelError` naming the streaming call when ``model`` is dispatched:
    in-place pruning would edit the meta placeholders, not the weights the hooks load."""
    if not is_dispatched(model):
        return
    offloaded = offloaded_parameters(model)
    where = (f"{len(offloaded)} of its parameters are offloaded by accelerate (e.g. {offloaded[0]!r})" if offloaded
             else f"accelerate spread it over {_devices(model)}")
    raise DispatchedModelError(
        f"{verb}(model) edits the weights in place, but this model is dispatched: {where}. Use "
        f"llmprune.streaming.{verb}_streaming(model, config, 'out/', tokenizer=..., calibration=...): it reads one "
        "decoder layer at a time from the model's devices and offload, writes the result to 'out/' and leaves "
        "the model as it is; load 'out/' with from_pretrained (device_map included) afterwards")


class ModelSource:
    """The weights of a loaded (possibly dispatched) model, read one tensor at a time: the parameter itself
    when it holds its value, else the offload hook's ``weights_map`` entry. Tensors are returned as CPU copies,
    so the passes never write into the user's model. The interface is :class:`llmprune.streaming.Checkpoint`'s.

    Raises :class:`DispatchedModelError` when a parameter is on the meta device and no accelerate hook holds
    its value, or when the weights are quantized.
    """

    def __init__(self, model: nn.Module):
        if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
            raise DispatchedModelError("quantized models cannot be pruned: load the model in a float dtype")
        self.model = model
        self.renames: list[tuple[str, str]] = []
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._keys: dict[int, set[str]] = {}  # keys of each weights map, listed once (membership would load them)
        self._where = {name: self._locate(name) for name, p in self._params.items() if p.device.type == "meta"}
        self.execution_device = self._execution_device()

    def _locate(self, name: str) -> tuple[Mapping, str]:
        """(weights map, key) of an offloaded parameter: the nearest hook on its module or, with
        ``place_submodules``, on an ancestor (``dispatch_model`` hooks whole blocks)."""
        parts = name.split(".")
        for k in range(len(parts) - 1, -1, -1):
            hook = _offload_hook(self.model.get_submodule(".".join(parts[:k])))
            if hook is None or (k < len(parts) - 1 and not hook.place_submodules):
                continue
            key = ".".join(parts[k:])
            if self._holds(hook.weights_map, key):
                return hook.weights_map, key
        raise DispatchedModelError(
            f"{name} is on the meta device but no accelerate hook holds its weights (offloaded weights without "
            "their AlignDevicesHook, e.g. after remove_hook_from_submodules, or a model built with "
            "init_empty_weights): load the model again with device_map=... / cpu_offload, or stream its "
            "checkpoint folder: prune_streaming('path/to/model', ...)")

    def _holds(self, weights_map: Mapping, key: str) -> bool:
        """``key in weights_map`` without loading the tensor (``Mapping.__contains__`` would read it)."""
        base, prefix = weights_map, ""
        if hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):  # accelerate's PrefixedDataset
            base, prefix = weights_map.dataset, weights_map.prefix
        if id(base) not in self._keys:
            self._keys[id(base)] = set(iter(base))  # iterating lists names only
        return prefix + key in self._keys[id(base)]

    def _execution_device(self) -> torch.device | None:
        """Where the hooks run the layers (the first non-CPU one), so the passes compute there too."""
        for module in self.model.modules():
            for h in _hooks(module):
                d = getattr(h, "execution_device", None)
                if d is not None and torch.device(d).type not in ("cpu", "meta"):
                    return torch.device(d)
        return None

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name_or_path", "") or type(self.model).__name__)

    @property
    def nbytes(self) -> int:
        seen = {id(p): p for p in self._params.values()}
        return sum(p.numel() * p.element_size() for p in seen.values())

    def numel(self, key: str) -> int:
        return self._params[key].numel()

    def identity(self) -> dict[str, Any]:
        """What a resumed run must match: the model's name, class and every tensor's name, shape and dtype."""
        return {"model": self.name, "class": type(self.model).__name__,
                "tensors": [(n, list(p.shape), str(p.dtype)) for n, p in self._params.items()]}

    def use_renames(self, renames: list[tuple[str, str]]) -> None:
        """Keys are already the model's parameter names; the renames only matter when writing."""
        self.renames = renames

    def __contains__(self, key: str) -> bool:
        return key in self._params

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """CPU copies of the tensors ``keys`` (offloaded ones read from their hook's weights map)."""
        out = {}
        for k in keys:
            if k in self._where:
                weights_map, key = self._where[k]
                t = weights_map[key]
            else:
                t = self._params[k]
            out[k] = t.detach().to("cpu", copy=True)
        return out
