"""``sparsify``: unstructured / N:M weight sparsity with a registered method (:mod:`.registry`: magnitude, Wanda,
RIA, SparseGPT, ALPS, each in its own module).

Weights are zeroed in place (shapes unchanged). With calibration (every method whose ``needs`` is not ``weights``)
the model is pruned one decoder layer at a time: the statistics the method needs of the layer's inputs are
gathered, its linear layers are pruned, and (``sequential=True``) its *pruned* output becomes the next layer's
input, as in SparseGPT/Wanda.

Example::

    from llmprune.sparsity import SparsityConfig, sparsify
    report = sparsify(model, SparsityConfig(method="sparsegpt", pattern="2:4"),
                              tokenizer=tok, calibration="calib.txt")
    report.overall_sparsity    # 0.5
    report.layers["model.layers.0.mlp.down_proj"]
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.base import weight_matrix
from ..calibration.calibrate import CalibrationError, InputStats
from ..calibration.engine import layer_by_layer, run_layer
from ..checkpoint.dispatched import check_not_dispatched
from ..core.progress import progress_bar
from ..calibration.calibrate import as_batches, check_calibration_fits
from ..calibration.hessian import HessianAccumulator
from ._common import DEFAULT_TARGETS, layer_targets
from .masks import check_nm, parse_pattern
from .owl import DEFAULT_SPREAD, DEFAULT_THRESHOLD
from .registry import (available_sparsity_allocations, available_sparsity_methods, get_sparsity_allocation,
                       get_sparsity_method, register_sparsity_allocation)

__all__ = ["SparsityConfig", "SparsityReport", "sparsify", "weight_sparsity"]


def _uniform_ratios(model, adapter, targets, batches, config, device) -> list[float]:
    """Every decoder layer at ``config.sparsity``."""
    return [config.sparsity] * len(targets)


register_sparsity_allocation("uniform", "every layer at --sparsity", needs="weights", layer_ratios=_uniform_ratios)


@dataclass
class SparsityConfig:
    """What weight sparsity to apply, round-tripping through JSON.

    Attributes:
        method: a registered method (:func:`~llmprune.sparsity.registry.available_sparsity_methods`):
            ``magnitude`` (|W|), ``wanda`` (|W|*||X||), ``sparsegpt`` (OBS reconstruction), ``alps`` (ADMM with
            a penalty schedule, then the exact weight update on the chosen support; Meng et al. 2024) or
            ``ria`` (relative importance and activations; Zhang et al. 2024).
        sparsity: fraction of weights zeroed in each target layer, in [0, 1). For an N:M pattern it must
            equal ``1 - n/m`` (0.5 for 2:4 and 4:8).
        pattern: ``unstructured`` or ``N:M`` (``n`` kept in every ``m`` consecutive inputs: ``2:4``, ``4:8``).
        targets: fnmatch patterns of linear layers inside the decoder blocks, matched against the full
            module name (``model.layers.0.mlp.down_proj``) or the name inside the block (``mlp.down_proj``);
            default every linear layer of every block.
        n_samples, seq_len, seed, batch_size: calibration windows (every method but magnitude, and OWL).
        sequential: feed each layer's pruned output to the next layer (otherwise the dense output).
        per: unstructured comparison group of magnitude/Wanda: ``row`` (each output row, Wanda) or
            ``layer``. SparseGPT always selects adaptively per column block.
        blocksize, percdamp: SparseGPT column block width and Hessian dampening (fraction of mean diag;
            ALPS uses the same dampening).
        allocation: a registered per-layer rule (:func:`~llmprune.sparsity.registry.available_sparsity_allocations`):
            ``uniform`` (every layer at ``sparsity``) or ``owl`` (per-block sparsity from the block's outlier
            ratio, within ``±spread``, parameter-weighted mean exactly ``sparsity``; unstructured only; Yin et
            al. 2024).
        spread, outlier_threshold: OWL's λ and M.
    """

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    n_samples: int = 128
    seq_len: int = 256
    seed: int = 0
    sequential: bool = True
    batch_size: int = 8
    per: Literal["row", "layer"] = "row"
    blocksize: int = 128
    percdamp: float = 0.01
    allocation: str = "uniform"
    spread: float = DEFAULT_SPREAD
    outlier_threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = list(self.targets)
        self.validate()

    def validate(self) -> None:
        if self.method not in available_sparsity_methods():
            raise ValueError(f"method={self.method!r}; choose one of {', '.join(available_sparsity_methods())}")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"sparsity={s!r} is out of range: it is the fraction of weights zeroed, in [0, 1)")
        if not isinstance(self.pattern, str):
            raise ValueError(f"pattern={self.pattern!r}; use 'unstructured' or 'N:M' such as '2:4'")
        nm = parse_pattern(self.pattern)
        if nm is not None and not math.isclose(float(s), 1 - nm[0] / nm[1], abs_tol=1e-9):
            raise ValueError(f"pattern {self.pattern} keeps {nm[0]} of every {nm[1]} weights, i.e. sparsity "
                             f"{1 - nm[0] / nm[1]:g}, but sparsity={s!r}; set sparsity={1 - nm[0] / nm[1]:g}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets={self.targets!r} must be a non-empty list of module-name patterns")
        for name in ("n_samples", "seq_len", "batch_size", "blocksize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.per not in ("row", "layer"):
            raise ValueError(f"per={self.per!r}; choose 'row' or 'layer'")
        if not 0.0 <= float(self.percdamp) < 1.0:
            raise ValueError(f"percdamp={self.percdamp!r} must be in [0, 1)")
        if self.allocation not in available_sparsity_allocations():
            raise ValueError(f"allocation={self.allocation!r}; choose one of "
                             f"{', '.join(available_sparsity_allocations())}")
        if nm is not None and not get_sparsity_allocation(self.allocation).nm:
            raise ValueError(f"allocation {self.allocation!r} varies the sparsity per layer, which an N:M pattern "
                             "fixes; use pattern='unstructured'")
        if not 0.0 <= float(self.spread) <= 0.5 or not float(self.outlier_threshold) > 0:
            raise ValueError("spread must be in [0, 0.5] and outlier_threshold > 0")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        return (get_sparsity_method(self.method).needs_calibration
                or get_sparsity_allocation(self.allocation).needs_calibration) and self.sparsity > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsityConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SparsityConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SparsityConfig":
        return cls.from_dict(json.loads(text))


@dataclass
class SparsityReport:
    """Achieved sparsity (fraction of exact zeros) per target layer and over all targets."""

    config: SparsityConfig
    layers: dict[str, float] = field(default_factory=dict)
    overall_sparsity: float = 0.0
    pruned_weights: int = 0
    total_weights: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def weight_sparsity(module: nn.Module) -> float:
    """Fraction of exactly-zero entries of a module's weight."""
    w = module.weight
    return float((w == 0).sum()) / max(w.numel(), 1)


@torch.no_grad()
def _prune_module(module: nn.Module, config: SparsityConfig, stats: Any, sparsity: float | None = None) -> None:
    """Prune ``module``'s weight in place with the config's method, reading ``stats`` (what the method needs)."""
    sparsity = config.sparsity if sparsity is None else sparsity
    get_sparsity_method(config.method).prune(weight_matrix(module), stats, sparsity, config)


@torch.no_grad()
def _prune_modules(modules: list[nn.Module], config: SparsityConfig, stats: Any, sparsity: float) -> None:
    """Prune modules that read one input (``stats``): one by one, or as one where the method has a joint solve
    (``prune_group``: SparseGPT's, which consumes the Hessian, so none outlives its group's solve). The pruned
    weights are written straight into the modules."""
    method = get_sparsity_method(config.method)
    if method.prune_group is None or len(modules) == 1:
        for mod in modules:
            _prune_module(mod, config, stats, sparsity)
        return
    method.prune_group([weight_matrix(m) for m in modules], stats, sparsity, config)


@torch.no_grad()
def sparsify(
    model: nn.Module,
    config: SparsityConfig | dict | None = None,
    tokenizer: Any = None,
    calibration: Any = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> SparsityReport:
    """Zero weights of the target linear layers in place; returns the achieved sparsity per layer.

    Args:
        config: a :class:`SparsityConfig` (or its dict form).
        tokenizer: needed when ``calibration`` is text.
        calibration: text file path, text, ``[n, seq_len]`` token-id tensor or list of batches; required
            by every method that reads calibration statistics (all but ``magnitude``) and by OWL.
        device: where each decoder layer runs during calibration (default: the model's device).

    A model dispatched with accelerate is refused (:class:`~llmprune.checkpoint.dispatched.DispatchedModelError`):
    :func:`llmprune.streaming.sparsify_streaming` takes it instead.
    """
    if config is None:
        config = SparsityConfig()
    elif isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    config.validate()
    check_not_dispatched(model, "sparsify")
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    targets = layer_targets(model, layers, config.targets)
    if not any(targets):
        raise ValueError(f"targets={config.targets} match no linear layer inside the decoder blocks")
    nm = config.nm
    if nm is not None:  # fail before touching any weight
        for group in targets:
            for name, mod in group:
                try:
                    check_nm(*nm, in_features=weight_matrix(mod).shape[1])
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None

    batches = None
    if config.needs_calibration:
        if calibration is not None:
            check_calibration_fits(model.config, config.n_samples, config.seq_len, context=False)
        batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
        if batches is None:
            raise CalibrationError(f"method {config.method!r} needs calibration data: pass calibration=<text file, "
                                   "text or token-id batches> (and tokenizer= for text)")

    if config.sparsity > 0:
        allocation = get_sparsity_allocation(config.allocation)
        layer_sparsity = allocation.layer_ratios(model, adapter, targets,
                                                 batches if allocation.needs_calibration else None, config, device)
        if not get_sparsity_method(config.method).needs_calibration:  # weights only: layer order irrelevant
            for group, s in zip(progress_bar(targets, desc=f"{config.method} pruning", disable=not progress),
                                layer_sparsity):
                for _, mod in group:
                    _prune_module(mod, config, None, s)
        else:
            _sequential(model, adapter, targets, batches, config, progress, device, layer_sparsity)

    report = SparsityReport(config=config)
    for group in targets:
        for name, mod in group:
            w = mod.weight
            zeros = int((w == 0).sum())
            report.layers[name] = zeros / max(w.numel(), 1)
            report.pruned_weights += zeros
            report.total_weights += w.numel()
    report.overall_sparsity = report.pruned_weights / max(report.total_weights, 1)
    report.seconds = time.perf_counter() - t0
    return report


@torch.no_grad()  # as layerwise_statistics: a layer's autograd graph would keep its weights and activations alive
def _sequential(model, adapter, targets, batches, config, progress, device, layer_sparsity, layer_io=None) -> None:
    """Calibrate and prune one decoder layer at a time on the layer-by-layer engine
    (:func:`llmprune.calibration.engine.layer_by_layer`); ``layer_io`` loads / writes / frees layers when
    streaming (:class:`llmprune.streaming.LayerStream`). ``config.sequential``: a pruned layer's own outputs feed
    the next layer, otherwise the outputs gathered before pruning do."""
    needs = get_sparsity_method(config.method).needs  # the statistics gathered: Gram matrix or per-feature
    for step in layer_by_layer(model, adapter, batches, device=device, layer_io=layer_io, progress=progress,
                               desc=f"{config.method} pruning layers"):
        i, layer, dev = step.index, step.layer, step.device
        shared = _SharedInputs(lambda mod: HessianAccumulator(weight_matrix(mod).shape[1], device=dev)
                               if needs == "hessian" else InputStats())
        modules = list(dict.fromkeys(mod for _, mod in targets[i]))
        outs = _gather(layer, modules, shared, step.inputs, step.args, dev)
        if not shared.consistent:  # input sharing changed between batches: statistics per module after all
            shared = _SharedInputs(shared.make, share=False)
            _gather(layer, modules, shared, step.inputs, step.args, dev)
        grouped = shared.groups(modules)
        for _, stats in grouped:  # accelerate launch: statistics of every process's windows
            stats.all_reduce()
        for members, stats in grouped:
            _prune_modules(members, config, stats, layer_sparsity[i])
        del shared, grouped
        # sequential with a pruned layer: None, so the engine recomputes the outputs on the pruned layer
        step.outputs = None if config.sequential and targets[i] else outs
        del outs


def _gather(layer: nn.Module, modules: list[nn.Module], shared: "_SharedInputs", hidden: list[torch.Tensor],
            layer_args: list, device: torch.device) -> list[torch.Tensor]:
    """Run ``layer`` on every calibration batch with ``modules``' inputs recorded in ``shared``; its outputs."""
    handles = [mod.register_forward_pre_hook(lambda m, a: shared.update(m, a[0])) for mod in modules]
    try:
        outs = []
        for b, h in enumerate(hidden):
            outs.append(run_layer(layer, h, *layer_args[b], device))
            shared.next_batch()
    finally:
        for h in handles:
            h.remove()
    return outs


class _SharedInputs:
    """Input statistics per distinct input: linears called with the same tensor (q/k/v, gate/up) share one.

    The first module to receive a tensor in a batch owns the statistics of it; a module later given the
    very same tensor object in that batch reads the owner's. ``consistent`` turns False if a module's
    owner differs between batches (then the caller gathers statistics per module, ``share=False``).
    """

    def __init__(self, make: Callable[[nn.Module], Any], share: bool = True):
        self.make = make
        self.share = share
        self.stats: dict[nn.Module, Any] = {}  # owner -> statistics
        self.owner: dict[nn.Module, nn.Module] = {}
        self.consistent = True
        self._batch: dict[int, tuple[torch.Tensor, nn.Module]] = {}  # id(input) -> (input, owner) this batch

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        seen = self._batch.get(id(x)) if self.share else None
        owner = seen[1] if seen is not None and seen[0] is x else module
        if self.owner.setdefault(module, owner) is not owner:
            self.consistent = False
        if owner is module:
            self._batch[id(x)] = (x, module)
            if module not in self.stats:
                self.stats[module] = self.make(module)
            self.stats[module].update(x)

    def next_batch(self) -> None:
        self._batch.clear()  # also drops the references that kept the inputs alive

    def groups(self, modules: list[nn.Module]) -> list[tuple[list[nn.Module], Any]]:
        """``(modules sharing one input, their statistics)`` in ``modules`` order; a module that never ran
        gets empty statistics of its own."""
        members: dict[nn.Module, list[nn.Module]] = {}
        for mod in modules:
            owner = self.owner.get(mod, mod)
            if owner not in self.stats:
                self.stats[owner] = self.make(owner)
            members.setdefault(owner, []).append(mod)
        return [(group, self.stats[owner]) for owner, group in members.items()]
