"""``use_kernels(model, config)``: swap chosen nn.Linear layers (and optionally SwiGLU MLPs) for
kernel-backed modules in place.

Per target linear (module name matched by ``fnmatch`` against ``config.targets`` and not
``config.exclude``):

* ``weight_24=True``                  -> ``Sparse24Linear`` (magnitude 2:4 unless the weight is
  already 2:4, e.g. from a 2:4 pruner; the layer's activation threshold, if any, is fused);
* otherwise                           -> ``ActSparseLinear`` with the layer's threshold
  (0.0 when none is given: exact, ready for thresholds later).

Per-layer thresholds come from ``config.thresholds`` (exact module names or fnmatch patterns) or,
for layers with a non-zero ``activation_sparsity`` target and no given threshold, from
``calibrate_thresholds`` on ``calib_batches``. ``config.ffn_neurons`` maps MLP module names to
kept neuron indices and turns those MLPs into ``GatherSwiGLUMLP``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import ActSparseLinear, GatherSwiGLUMLP, Sparse24Linear

__all__ = ["KernelConfig", "calibrate_thresholds", "DEFAULT_TARGETS", "find_targets"]

DEFAULT_TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


@dataclass
class KernelConfig:
    """Which layers become kernel-backed modules. JSON round trip via ``to_dict`` / ``from_dict`` (or ``to_json``/``from_json``).

    targets: fnmatch patterns of nn.Linear module names to replace.
    exclude: patterns never replaced (lm_head by default).
    activation_sparsity: target fraction of zeroed inputs, one float for all targets or
        ``{pattern: float}``; only used to calibrate layers without an explicit threshold.
    thresholds: ``{module name or pattern: threshold}``; takes precedence over calibration.
    weight_24: store target weights as 2:4 compressed (``Sparse24Linear``).
    ffn_neurons: ``{mlp module name: [kept neuron indices]}`` -> ``GatherSwiGLUMLP``.
    """

    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "*.lm_head"])
    activation_sparsity: float | dict[str, float] = 0.0
    thresholds: dict[str, float] | None = None
    weight_24: bool = False
    ffn_neurons: dict[str, list[int]] | None = None

    def __post_init__(self):
        sp = self.activation_sparsity
        vals = sp.values() if isinstance(sp, dict) else [sp]
        for v in vals:
            if not (0.0 <= float(v) < 1.0):
                raise ValueError(f"activation_sparsity must be in [0, 1), got {v}")
        for k, v in (self.thresholds or {}).items():
            if not (float(v) >= 0.0):
                raise ValueError(f"threshold for {k!r} must be >= 0, got {v}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown KernelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "KernelConfig":
        return cls.from_dict(json.loads(s))

    # -- resolution helpers -------------------------------------------------
    def matches(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.targets)

    def sparsity_for(self, name: str) -> float:
        sp = self.activation_sparsity
        if isinstance(sp, dict):
            return float(_lookup(sp, name, 0.0))
        return float(sp)

    def threshold_for(self, name: str):
        return None if not self.thresholds else _lookup(self.thresholds, name, None)


def _lookup(d: dict, name: str, default):
    if name in d:
        return d[name]
    for pat, v in d.items():
        if fnmatch.fnmatchcase(name, pat):
            return v
    return default


def find_targets(model: nn.Module, config: KernelConfig) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and config.matches(n)]


def calibrate_thresholds(model: nn.Module, batches, sparsity, targets=None, max_samples: int = 1 << 18) -> dict[str, float]:
    """TEAL-style thresholds for ``use_kernels``: the ``sparsity``-quantile of each target's |input|.

    ``batches`` are token-id tensors; ``sparsity`` is a float or ``{pattern: float}``. Delegates to
    :func:`llmprune.sparsity.calibrate_activation_thresholds` (layer by layer, each layer calibrated on
    inputs with the earlier thresholds applied).
    """
    from ..sparsity.activation import calibrate_activation_thresholds

    return calibrate_activation_thresholds(model, calibration=list(batches), sparsity=sparsity,
                                           targets=list(targets or DEFAULT_TARGETS), max_samples=max_samples,
                                           progress=False)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


