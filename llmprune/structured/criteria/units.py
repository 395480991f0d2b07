"""Registry of the criteria that remove whole units of the other kinds: hidden channels, decoder layers, experts.

Heads and FFN neurons are chosen by the run's method (:class:`~.base.Criterion`, ``PruneConfig.method``). The
other kinds have criteria of their own, each registered here once, in the module that holds its maths:

- ``hidden`` (``PruneConfig.hidden`` by ``PruneConfig.hidden_method``): ``minitron`` and ``rms``
  (:mod:`llmprune.structured.hidden`); ``fn(norm_stats, n_remove) -> (kept channels, norm scales or None)``;
- ``layers`` (``PruneConfig.layers``): ``block_influence`` (:mod:`.block_influence`);
  ``fn(block_influence per layer, n_remove) -> removed layers``;
- ``experts`` (``PruneConfig.experts``): ``routing_mass`` (:mod:`.routing_mass`);
  ``fn(experts_spec, layer_stats or None) -> one score per expert`` (higher = more important);
- ``vocab`` (``PruneConfig.vocab``): ``frequency`` (:mod:`llmprune.structured.vocab`);
  ``fn(token counts, tokenizer vocabulary, n_keep) -> kept token ids``.

Each declares what it needs: ``calibration`` (``required``, ``optional``: used when given, or ``none``) and
``needs``, the statistics it reads (:data:`NEEDS`), and whether a streamed run (one layer in memory) can run it.
A kind with no config field naming its criterion (layers, experts, vocab) runs its ``default`` one.

Example::

    crit = get_unit_criterion("hidden", config.hidden_method)
    kept, scales = crit.fn(norm_stats, n_remove)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

__all__ = ["UnitCriterion", "NEEDS", "register_unit_criterion", "get_unit_criterion", "available_unit_criteria"]

UnitKind = Literal["hidden", "layers", "experts", "vocab"]
Calibration = Literal["required", "optional", "none"]

#: the statistics a unit criterion may read (its ``needs``), gathered before ``fn`` runs
NEEDS = {
    "weights": "the weights alone",
    "norm_outputs": "every hidden norm's mean |output| per channel (llmprune.calibration.norms.norm_statistics)",
    "norm_samples": "every hidden norm's squared inputs and outputs on sampled calibration tokens",
    "block_influence": "each decoder layer's Block Influence, 1 - cos(input, output), on calibration tokens",
    "router_mass": "each expert's routing weight summed over the calibration tokens",
    "token_counts": "how often each token id occurs in the domain text (PruneConfig.vocab_text or the calibration)",
}


@dataclass(frozen=True)
class UnitCriterion:
    """One criterion of a whole-unit kind, registered once.

    Attributes:
        kind: ``hidden``, ``layers``, ``experts`` or ``vocab``.
        name: its name (``PruneConfig.hidden_method`` for hidden channels).
        description: one line for the command-line help.
        fn: the criterion (signature per kind: see the module docstring).
        calibration: ``required``, ``optional`` (calibration statistics are used when given) or ``none``.
        needs: the statistics it reads (keys of :data:`NEEDS`).
        streams: whether a streamed run (:func:`llmprune.streaming.prune_streaming`) can run it.
        default: the criterion its kind runs when the config names none.
    """

    kind: UnitKind
    name: str
    description: str
    fn: Callable
    calibration: Calibration
    needs: tuple[str, ...]
    streams: bool = False
    default: bool = False

    @property
    def needs_calibration(self) -> bool:
        """Calibration data is required."""
        return self.calibration == "required"

    @property
    def uses_calibration(self) -> bool:
        """Calibration data is read when given."""
        return self.calibration != "none"


_UNIT_CRITERIA: dict[str, dict[str, UnitCriterion]] = {kind: {} for kind in get_args(UnitKind)}


def register_unit_criterion(kind: UnitKind, name: str, description: str, fn: Callable, calibration: Calibration,
                            needs: tuple[str, ...], streams: bool = False, default: bool = False) -> UnitCriterion:
    """Register a hidden-channel, layer, expert or vocabulary criterion (one call, in the module of its maths); returns it."""
    if kind not in _UNIT_CRITERIA:
        raise ValueError(f"unit kind {kind!r}; choose one of {', '.join(_UNIT_CRITERIA)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} criterion needs a non-empty name, got {name!r}")
    registry = _UNIT_CRITERIA[kind]
    if name in registry:
        raise ValueError(f"{kind} criterion {name!r} is already registered")
    if calibration not in get_args(Calibration):
        raise ValueError(f"{kind} criterion {name!r}: calibration={calibration!r}; choose one of "
                         f"{', '.join(get_args(Calibration))}")
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"{kind} criterion {name!r}: unknown needs {', '.join(unknown)}; choose from "
                         f"{', '.join(NEEDS)}")
    if default and any(c.default for c in registry.values()):
        raise ValueError(f"{kind} criterion {name!r}: the kind already has a default criterion")
    criterion = UnitCriterion(kind, name, description, fn, calibration, tuple(needs), streams, default)
    registry[name] = criterion
    return criterion


def get_unit_criterion(kind: UnitKind, name: str | None = None) -> UnitCriterion:
    """The registered ``kind`` criterion ``name`` (``None``: the kind's default); ``ValueError`` naming the
    available ones otherwise."""
    if kind not in _UNIT_CRITERIA:
        raise ValueError(f"unit kind {kind!r}; choose one of {', '.join(_UNIT_CRITERIA)}")
    registry = _UNIT_CRITERIA[kind]
    found = (next((c for c in registry.values() if c.default), None) if name is None
             else registry.get(name) if isinstance(name, str) else None)
    if found is None:
        what = "no default" if name is None else f"unknown {kind} criterion {name!r}"
        raise ValueError(f"{what}; available: {', '.join(available_unit_criteria(kind)) or 'none registered'}")
    return found


def available_unit_criteria(kind: UnitKind) -> list[str]:
    """The registered criteria of ``kind``, sorted."""
    return sorted(_UNIT_CRITERIA[kind])
