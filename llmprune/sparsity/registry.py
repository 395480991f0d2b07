"""Registry of the weight-sparsity methods: each registers once, in its own module, what it needs and how it prunes.

``needs`` names the statistics the pipeline gathers for the method's layers and hands to ``prune`` as ``stats``:

- ``weights``: nothing (``stats`` is ``None``; no calibration data, layers taken in any order);
- ``norms``: per-input-feature statistics (:class:`llmprune.calibration.calibrate.InputStats`: ``norm``, ``count``);
- ``hessian``: the input Gram matrix (:class:`llmprune.calibration.hessian.HessianAccumulator`: ``hessian()``,
  ``release()``).

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

__all__ = ["SparsityMethod", "register_sparsity_method", "get_sparsity_method", "available_sparsity_methods"]

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


_METHODS: dict[str, SparsityMethod] = {}


def register_sparsity_method(name: str, description: str, needs: Needs, prune: PruneFn,
                             prune_group: PruneGroupFn | None = None, streams: bool = True) -> SparsityMethod:
    """Register a weight-sparsity method (one call per method, in its own module); returns it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a sparsity method needs a non-empty name, got {name!r}")
    if needs not in get_args(Needs):
        raise ValueError(f"sparsity method {name!r}: needs={needs!r}; choose one of {', '.join(get_args(Needs))}")
    if name in _METHODS:
        raise ValueError(f"sparsity method {name!r} is already registered")
    method = SparsityMethod(name, description, needs, prune, prune_group, streams)
    _METHODS[name] = method
    return method


def get_sparsity_method(name: str) -> SparsityMethod:
    """The registered method ``name``; ``ValueError`` naming the available ones otherwise."""
    method = _METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"unknown sparsity method {name!r}; choose one of {', '.join(available_sparsity_methods())}")
    return method


def available_sparsity_methods() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_METHODS))
