"""Typed configuration of a pruning run and the resulting plan, both round-tripping through JSON.

Example::

    cfg = PruneConfig(heads=0.25, ffn=0.25, method="wanda")
    assert PruneConfig.from_json(cfg.to_json()) == cfg
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = ["PruneConfig", "LayerPlan", "PrunePlan", "RECIPE_VERSION"]

#: bumped whenever the saved recipe's meaning changes
RECIPE_VERSION = 1


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass
class PruneConfig(_JsonMixin):
    """What to prune and how.

    Attributes:
        heads: fraction of attention (query) heads removed per layer on average, in [0, 1).
        ffn: fraction of FFN neurons removed, in [0, 1).
        layers: number of whole decoder blocks removed (ranked by Block Influence, ShortGPT).
        experts: fraction of experts removed from every mixture-of-experts layer, in [0, 1) (uniform).
            With calibration data experts are ranked by routing mass (selection frequency x mean routing
            weight on the calibration tokens); without, by the L2 norm of their weights. In MoE layers
            ``ffn`` prunes neurons inside each expert (each expert its own, the same count in all).
        method: importance criterion name (see ``llmprune.criteria.available_criteria()``).
        allocation: ``uniform`` (same widths in every layer -> a standard checkpoint), ``global``
            (per-layer widths from globally comparable, per-layer-normalised scores), ``error`` (the
            parameters that ``heads``/``ffn`` remove uniformly go where each layer's output reconstruction
            error per parameter is lowest, heads and FFN neurons competing for the same budget) or
            ``block_influence`` (each layer's ratios move within ``±spread`` of ``heads``/``ffn``, less
            pruning where the layer's Block Influence is higher), or ``fisher`` (method ``obs``: each
            kind's uniform total goes where the estimated loss increase, the OBS cost weighed by the output
            Fisher, is lowest; :mod:`llmprune.calibration.fisher`). See :mod:`llmprune.allocate`.
        attention_unit: ``group`` removes whole KV groups (a KV head with its query heads; shrinks the KV
            cache) or ``query`` removes the same number of query heads from every KV group. ``auto`` (default)
            is resolved once per model, before any work, by :func:`llmprune.select.resolve_attention_unit`:
            ``group`` for MHA, ``query`` with at most 4 KV heads (MQA, 2-4 groups), else ``group`` when
            ``heads * num_kv_heads`` is within 0.25 of a non-zero whole number of groups, else ``query``.
            :func:`llmprune.prune` works on the resolved copy, so results and saved recipes name the concrete unit.
        rounding: what to do when ``heads`` does not give whole units: ``nearest`` (default: the closest
            valid count, which may be 0), ``down``, ``up``, or ``error`` (a :class:`RatioError` listing the
            valid ratios). FFN counts are always rounded to the nearest neuron.
        multiple_of: kept FFN widths are rounded down to a multiple of this (hardware-friendly sizes).
        min_keep: in non-uniform allocations, the smallest fraction of a layer's units that is kept.
        n_samples, seq_len, seed: calibration windows drawn from the calibration text.
        batch_size: calibration batch size.
        bias_compensation: add the removed heads' / neurons' mean contribution over the calibration
            tokens to the bias of o_proj / down_proj (FLAP); biases are created where the family's config
            can declare them. With ``reconstruct``, or method ``obs``, the bias is refitted jointly with the
            weights (a constant input of 1 in the least squares).
        reconstruct: after removing heads / neurons, refit the projection that consumes them (the
            adapter's ``output`` slot: o_proj, down_proj, GPT-2 ``c_proj``, ...) by damped least squares on
            calibration inputs, layer by layer with the inputs of the already pruned layers
            (:mod:`llmprune.reconstruct`).
        percdamp: damping of the reconstruction, as a fraction of the mean diagonal of the Gram matrix.
        spread: ``block_influence`` allocation: layer ratios span ``2 * spread`` around the target.
        fisher_samples: ``fisher`` allocation: calibration windows of the one forward/backward pass that
            estimates the output Fisher (:mod:`llmprune.calibration.fisher`).
        fisher_joint: ``fisher`` allocation: heads and FFN neurons compete for one budget (the parameters
            that ``heads`` / ``ffn`` remove uniformly, as with ``error``) instead of each kind keeping its
            total, so the achieved head and neuron fractions move away from the requested ones.
        fisher_labels: ``fisher`` allocation: ``data`` weighs errors by the loss of the calibration text's own next
            tokens (the empirical Fisher); ``model`` by next tokens sampled from the unpruned model's predictions
            (the true Fisher: the curvature of the KL divergence from the unpruned model).
        fisher_diagonal: keep only the Fisher's diagonal (``hidden`` floats per projection instead of
            ``hidden²``: for models whose full factors would not fit in memory).
        refit_target: what method ``obs`` refits o_proj / down_proj towards. ``layer``: the layer's own outputs
            on its current inputs (those of the already pruned layers). ``dense``: the *original* model's
            outputs of that projection on the original hidden states, so each layer also corrects the error
            that the layers before it left (a second stream of hidden states runs through an unmodified copy
            of each layer: about twice the layer forwards, one extra layer in memory).
        hidden: fraction of the hidden (embedding) channels removed, in [0, 1): the same channels leave the
            embeddings, every norm, every projection reading or writing the residual stream and the LM head
            (Minitron's width axis; :mod:`llmprune.structured.hidden`). Applied before heads / FFN neurons,
            which are then chosen on the narrower model.
        hidden_method: how channels are chosen: ``minitron`` (mean |activation| after every norm, summed
            over norms) or ``rms`` (greedy: the channels whose removal changes the normalised outputs least,
            RMS rescaling included, with each norm's weight corrected in closed form for its new RMS).
        params: fraction of *all* parameters (embeddings included) to remove; the split among ``hidden``,
            ``heads`` and ``ffn`` is chosen among a few candidates by calibration loss
            (:mod:`llmprune.structured.budget`). Excludes giving those three.
    """

    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0
    experts: float = 0.0
    method: str = "wanda"
    allocation: Literal["uniform", "global", "error", "block_influence", "fisher"] = "uniform"
    attention_unit: Literal["auto", "group", "query"] = "auto"
    rounding: Literal["error", "down", "up", "nearest"] = "nearest"
    multiple_of: int = 1
    min_keep: float = 0.1
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    bias_compensation: bool = False
    reconstruct: bool = False
    percdamp: float = 0.01
    spread: float = 0.1
    fisher_samples: int = 16
    fisher_joint: bool = False
    fisher_diagonal: bool = False
    fisher_labels: Literal["data", "model"] = "data"
    refit_target: Literal["layer", "dense"] = "layer"
    hidden: float = 0.0
    hidden_method: Literal["minitron", "rms"] = "minitron"
    params: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def recommended(cls, heads: float = 0.0, ffn: float = 0.0, *, streaming: bool = False,
                    **overrides: Any) -> "PruneConfig":
        """The recipe measured best on real models (BENCHMARKS.md, SmolLM2-135M), which ``llmprune prune``
        runs when no ``--method`` / ``--allocation`` is given: method ``obs`` with the ``fisher`` allocation on
        128 windows of 1024 tokens for heads and FFN neurons in memory, its Fisher taken on next tokens sampled
        from the model (``fisher_labels="model"``; SmolLM2-135M at 25%: 45.39 / 46.76 / 46.68 / 46.51 PPL at seeds
        0-3 of the windows, against 47.61 / 50.06 at seeds 0-1 with the text's own next tokens); ``wanda``
        (uniform, 32 x 256) where obs does not apply (layer or expert removal, bias compensation, streaming).
        ``overrides`` win.

        Example::

            cfg = PruneConfig.recommended(heads=0.25, ffn=0.25)       # obs + fisher
            cfg = PruneConfig.recommended(layers=4)                    # wanda, uniform
        """
        obs_ok = not (overrides.get("layers") or overrides.get("experts") or overrides.get("bias_compensation")
                      or streaming)
        method = overrides.pop("method", None) or ("obs" if obs_ok else "wanda")
        allocation = overrides.pop("allocation", None) or ("fisher" if method == "obs" and obs_ok else "uniform")
        defaults = {"n_samples": 128 if method == "obs" else 32, "seq_len": 1024 if method == "obs" else 256,
                    "fisher_labels": "model" if allocation == "fisher" else "data"}
        for name, value in defaults.items():
            if overrides.get(name) is None:
                overrides[name] = value
        return cls(heads=heads, ffn=ffn, method=method, allocation=allocation, **overrides)

    def validate(self) -> None:
        for name in ("heads", "ffn", "experts", "hidden", "params"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name}={value!r} is out of range: it is the fraction removed and must be in [0, 1)")
        if not isinstance(self.layers, int) or self.layers < 0:
            raise ValueError(f"layers={self.layers!r} must be a non-negative number of blocks to remove")
        choices = {"allocation": ("uniform", "global", "error", "block_influence", "fisher"),
                   "attention_unit": ("auto", "group", "query"), "rounding": ("error", "down", "up", "nearest"),
                   "refit_target": ("layer", "dense"), "fisher_labels": ("data", "model"),
                   "hidden_method": ("minitron", "rms")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.multiple_of < 1:
            raise ValueError("multiple_of must be >= 1")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError("min_keep must be in (0, 1]")
        for name in ("n_samples", "seq_len", "batch_size", "fisher_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp={self.percdamp!r} must be in [0, 1)")
        if self.allocation == "fisher" and self.method != "obs":
            raise ValueError("allocation='fisher' prices removals with the obs method; use method='obs'")
        if self.fisher_joint and self.allocation != "fisher":
            raise ValueError("fisher_joint shares the fisher allocation's budget between heads and FFN neurons; "
                             "use allocation='fisher'")
        if self.method == "obs" and self.allocation in ("global", "block_influence"):
            raise ValueError(f"method 'obs' chooses units inside the sequential pass; allocation "
                             f"{self.allocation!r} needs per-unit scores: use uniform, error or fisher")
        if self.refit_target == "dense" and self.method != "obs":
            raise ValueError("refit_target='dense' is a refit of method 'obs'; use method='obs'")
        if not 0.0 <= self.spread <= 0.5:
            raise ValueError(f"spread={self.spread!r} must be in [0, 0.5]")
        if self.params > 0 and (self.hidden or self.heads or self.ffn or self.layers or self.experts):
            raise ValueError("params chooses hidden / heads / ffn itself: give params alone (no hidden, heads, ffn, "
                             "layers or experts)")


@dataclass
class LayerPlan(_JsonMixin):
    """Kept unit indices of one original layer (``None``: that kind is untouched)."""

    kept_heads: list[int] | None = None
    kept_kv_heads: list[int] | None = None
    kept_neurons: list[int] | None = None
    #: mixture of experts: kept experts (original indices), and per original expert its kept neurons
    kept_experts: list[int] | None = None
    kept_expert_neurons: list[list[int]] | None = None


@dataclass
class PrunePlan(_JsonMixin):
    """Kept indices for every original layer, plus the removed layers (original indices)."""

    layers: list[LayerPlan] = field(default_factory=list)
    removed_layers: list[int] = field(default_factory=list)
    #: hidden channels kept (original indices; ``None``: hidden size untouched), applied before the layers'
    #: plans; and the closed-form scale of each norm's output (module name -> factor, ``rms`` method)
    kept_hidden: list[int] | None = None
    hidden_norm_scales: dict[str, float] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunePlan":
        return cls(layers=[LayerPlan.from_dict(x) for x in data.get("layers", [])],
                   removed_layers=list(data.get("removed_layers", [])),
                   kept_hidden=data.get("kept_hidden"), hidden_norm_scales=data.get("hidden_norm_scales"))

    @property
    def kept_layers(self) -> list[int]:
        return [i for i in range(len(self.layers)) if i not in set(self.removed_layers)]
