"""Registry of the weight-sparsity methods: each registers once, in its own module, what it needs and how it prunes.

``needs`` names the statistics the pipeline gathers for the method's layers and hands to ``prune`` as ``stats``:

- ``weights``: nothing (``stats`` is ``None``; no calibration data, layers taken in any order);
- ``norms``: per-input-feature statistics (:class:`llmprune.calibration.calibrate.InputStats`: ``norm``, ``count``);
- ``hessian``: the input Gram matrix (:class:`llmprune.calibration.hessian.HessianAccumulator`: ``hessian()``,
  ``release()``).

Two more kinds register here the same way, once each, in the module that holds their maths:

- per-layer sparsity allocations (``SparsityConfig.allocation``, :class:`SparsityAllocation`): ``uniform``
  (:mod:`.api`) and ``owl`` (:mod:`.owl`), with the statistics they read of the *dense* model before any layer is
  pruned (``needs``: ``weights`` or ``norms``);
- activation-sparsity threshold methods (``sparsify --activation-sparsity``, :class:`ActivationSparsityMethod`):
  ``teal`` (:mod:`.activation`), which reads histograms of each target's inputs, sequentially (earlier
  thresholds applied).

Example (a method in its own module, imported by ``llmprune/sparsity/__init__.py`` so that it registers)::

    @torch.no_grad()
    def _prune(weight, stats, sparsity, config):
        weight.mul_(magnitude_mask(weight, sparsity, nm=config.nm, per=config.per).to(weight.dtype))

    register_sparsity_method("magnitude", "|W|, no data", needs="weights", prune=_prune)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch

__all__ = ["SparsityMethod", "register_sparsity_method", "get_sparsity_method", "available_sparsity_methods",
           "SparsityAllocation", "register_sparsity_allocation", "get_sparsity_allocation",
           "available_sparsity_allocations", "ActivationSparsityMethod", "register_activation_method",
           "get_activation_method", "available_activation_methods"]

Needs = Literal["weights", "norms", "hessian"]

#: ``prune(weight, stats, sparsity, config)``: writes the pruned weights into ``weight`` (the module's ``[out, in]``
#: weight view); ``config`` is the run's :class:`llmprune.sparsity.SparsityConfig`
PruneFn = Callable[[torch.Tensor, Any, float, Any], None]
#: ``prune_group(weights, stats, sparsity, config)``: the same for several weights reading one input (q/k/v,
#: gate/up), sharing ``stats``
PruneGroupFn = Callable[[list[torch.Tensor], Any, float, Any], None]


@dataclass(frozen=True)
class SparsityMethod:
    """One weight-sparsity method, registered once.

    Attributes:
        name: the ``SparsityConfig.method`` / ``--method`` value.
        description: one line for the command-line help.
        needs: the statistics ``prune`` reads (see the module docstring).
        prune: ``prune(weight, stats, sparsity, config)``, writing the new weights into ``weight``.
        prune_group: optional joint solve of the weights reading one input (one ``stats`` for all of them);
            without it each weight is pruned alone with the shared ``stats``.
        streams: whether a streamed run (:func:`llmprune.streaming.sparsify_streaming`) can run it.
    """

    name: str
    description: str
    needs: Needs
    prune: PruneFn
    prune_group: PruneGroupFn | None = None
    streams: bool = True

    @property
    def needs_calibration(self) -> bool:
        """It reads calibration statistics (``needs`` is not ``weights``)."""
        return self.needs != "weights"


def _check_name(kind: str, name: Any, registry: dict) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} needs a non-empty name, got {name!r}")
    if name in registry:
        raise ValueError(f"{kind} {name!r} is already registered")


def _lookup(kind: str, name: Any, registry: dict) -> Any:
    found = registry.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(sorted(registry))}")
    return found


_METHODS: dict[str, SparsityMethod] = {}


def register_sparsity_method(name: str, description: str, needs: Needs, prune: PruneFn,
                             prune_group: PruneGroupFn | None = None, streams: bool = True) -> SparsityMethod:
    """Register a weight-sparsity method (one call per method, in its own module); returns it."""
    _check_name("sparsity method", name, _METHODS)
    if needs not in get_args(Needs):
        raise ValueError(f"sparsity method {name!r}: needs={needs!r}; choose one of {', '.join(get_args(Needs))}")
    method = SparsityMethod(name, description, needs, prune, prune_group, streams)
    _METHODS[name] = method
    return method


def get_sparsity_method(name: str) -> SparsityMethod:
    """The registered method ``name``; ``ValueError`` naming the available ones otherwise."""
    return _lookup("sparsity method", name, _METHODS)


def available_sparsity_methods() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_METHODS))


# ---- per-layer sparsity allocations ---------------------------------------------------------------------------
#: ``layer_ratios(model, adapter, targets, batches, config, device)``: one sparsity per decoder layer (``targets``:
#: each layer's ``[(name, module)]``; ``batches``: the calibration batches, ``None`` for an allocation that reads
#: the weights alone)
LayerRatiosFn = Callable[..., list]


@dataclass(frozen=True)
class SparsityAllocation:
    """One per-layer sparsity rule (``SparsityConfig.allocation`` / ``--allocation``), registered once.

    Attributes:
        name: the ``SparsityConfig.allocation`` value.
        description: one line for the command-line help.
        needs: what it reads of the dense model before any layer is pruned: ``weights`` (nothing) or ``norms``
            (per-input-feature norms of each target, one whole-model calibration pass).
        layer_ratios: ``layer_ratios(model, adapter, targets, batches, config, device) -> [sparsity per layer]``.
        nm: it supports N:M patterns (which fix every layer's sparsity).
        streams: whether :func:`llmprune.streaming.sparsify_streaming` can run it (one layer in memory).
    """

    name: str
    description: str
    needs: Needs
    layer_ratios: LayerRatiosFn
    nm: bool = True
    streams: bool = True

    @property
    def needs_calibration(self) -> bool:
        return self.needs != "weights"


_ALLOCATIONS: dict[str, SparsityAllocation] = {}


def register_sparsity_allocation(name: str, description: str, needs: Needs, layer_ratios: LayerRatiosFn,
                                 nm: bool = True, streams: bool = True) -> SparsityAllocation:
    """Register a per-layer sparsity allocation (one call, in its own module); returns it."""
    _check_name("sparsity allocation", name, _ALLOCATIONS)
    if needs not in ("weights", "norms"):
        raise ValueError(f"sparsity allocation {name!r}: needs={needs!r}; choose weights or norms")
    allocation = SparsityAllocation(name, description, needs, layer_ratios, nm, streams)
    _ALLOCATIONS[name] = allocation
    return allocation


def get_sparsity_allocation(name: str) -> SparsityAllocation:
    """The registered allocation ``name``; ``ValueError`` naming the available ones otherwise."""
    return _lookup("sparsity allocation", name, _ALLOCATIONS)


def available_sparsity_allocations() -> tuple[str, ...]:
    """The registered allocation names, sorted."""
    return tuple(sorted(_ALLOCATIONS))


# ---- activation-sparsity thresholds ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationSparsityMethod:
    """One way to calibrate activation-sparsity thresholds (``sparsify --activation-method``), registered once.

    Attributes:
        name: the ``--activation-method`` value.
        description: one line for the command-line help.
        calibrate: ``calibrate(model, tokenizer, calibration, sparsity=..., targets=..., ...)`` with the keywords of
            :func:`llmprune.sparsity.calibrate_activation_thresholds` (``layer_io`` and ``on_layer`` when
            streamed) -> ``{full module name: threshold}``.
        needs: what it reads: ``input_histograms`` (the magnitudes of each target's inputs on calibration data).
        sequential: each layer's thresholds are calibrated on inputs with the earlier thresholds applied.
        streams: whether :func:`llmprune.streaming.sparsify_streaming` can run it.
    """

    name: str
    description: str
    calibrate: Callable[..., dict]
    needs: Literal["input_histograms"] = "input_histograms"
    sequential: bool = True
    streams: bool = True

    @property
    def needs_calibration(self) -> bool:
        return True


_ACTIVATION: dict[str, ActivationSparsityMethod] = {}


def register_activation_method(name: str, description: str, calibrate: Callable[..., dict],
                               needs: Literal["input_histograms"] = "input_histograms", sequential: bool = True,
                               streams: bool = True) -> ActivationSparsityMethod:
    """Register an activation-sparsity threshold method (one call, in its own module); returns it."""
    _check_name("activation-sparsity method", name, _ACTIVATION)
    if needs != "input_histograms":
        raise ValueError(f"activation-sparsity method {name!r}: needs={needs!r}; choose input_histograms")
    method = ActivationSparsityMethod(name, description, calibrate, needs, sequential, streams)
    _ACTIVATION[name] = method
    return method


def get_activation_method(name: str) -> ActivationSparsityMethod:
    """The registered activation-sparsity method ``name``; ``ValueError`` naming the available ones otherwise."""
    return _lookup("activation-sparsity method", name, _ACTIVATION)


def available_activation_methods() -> tuple[str, ...]:
    """The registered activation-sparsity method names, sorted."""
    return tuple(sorted(_ACTIVATION))
