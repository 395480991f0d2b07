"""Typed configuration of a pruning run and the resulting plan, both round-tripping through JSON.

Example::

    cfg = PruneConfig(heads=0.25, ffn=0.25)        # the default method, obs, with its fisher allocation
    assert PruneConfig.from_json(cfg.to_json()) == cfg
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

__all__ = ["PruneConfig", "LayerPlan", "PrunePlan", "RatioError", "RECIPE_VERSION", "SingleUnitScore"]

#: bumped whenever the saved recipe's meaning changes
RECIPE_VERSION = 2


#: method ``single-unit``: how a unit's solo performance is scored (:mod:`llmprune.calibration.single_unit`);
#: the first is the default
SingleUnitScore = Literal["clusters", "snr", "solo-loss", "solo-loss-refit"]


class RatioError(ValueError):
    """A pruning ratio cannot be realised under the model's structure."""


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
        method: the structured method (``llmprune.structured.criteria.available_criteria()``): ``obs`` (the
            default) chooses heads and neurons greedily with the optimal refit; the others are per-unit scores.
            Layer removal (Block Influence) and expert removal (routing mass) have their own criteria, whatever
            the method.
        allocation: ``None`` (default): the method's own (``fisher`` for ``obs``, ``uniform`` for the scores),
            resolved before any work so results and saved recipes name it. ``uniform`` (same widths in every layer -> a standard checkpoint), ``global``
            (per-layer widths from globally comparable, per-layer-normalised scores), ``error`` (the
            parameters that ``heads``/``ffn`` remove uniformly go where each layer's output reconstruction
            error per parameter is lowest, heads and FFN neurons competing for the same budget) or
            ``block_influence`` (each layer's ratios move within ``±spread`` of ``heads``/``ffn``, less
            pruning where the layer's Block Influence is higher), or ``fisher`` (method ``obs``: each
            kind's uniform total goes where the estimated loss increase, the OBS cost weighed by the output
            Fisher, is lowest; :mod:`llmprune.calibration.fisher`). See :mod:`llmprune.core.allocate`.
        attention_unit: ``group`` removes whole KV groups (a KV head with its query heads; shrinks the KV
            cache) or ``query`` removes the same number of query heads from every KV group. ``auto`` (default)
            is resolved once per model, before any work, by :func:`llmprune.structured.select.resolve_attention_unit`:
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
            (:mod:`llmprune.structured.reconstruct`).
        percdamp: damping of the reconstruction, as a fraction of the mean diagonal of the Gram matrix.
        spread: ``block_influence`` allocation: layer ratios span ``2 * spread`` around the target.
        fisher_samples: ``fisher`` allocation: calibration windows of the one forward/backward pass that
            estimates the output Fisher (:mod:`llmprune.calibration.fisher`).
        fisher_labels: ``fisher`` allocation: ``model`` (default) weighs errors by the loss of next tokens sampled
            from the unpruned model's predictions (the true Fisher: the curvature of the KL divergence from the
            unpruned model); ``data`` by the loss of the calibration text's own next tokens (the empirical Fisher).
        fisher_diagonal: keep only the Fisher's diagonal (``hidden`` floats per projection instead of
            ``hidden²``: for models whose full factors would not fit in memory).
        hidden: fraction of the hidden (embedding) channels removed, in [0, 1): the same channels leave the
            embeddings, every norm, every projection reading or writing the residual stream and the LM head
            (Minitron's width axis; :mod:`llmprune.structured.hidden`). Applied before heads / FFN neurons,
            which are then chosen on the narrower model.
        hidden_method: how channels are chosen: a registered hidden-channel criterion
            (``llmprune.structured.criteria.available_unit_criteria("hidden")``, checked by
            :func:`llmprune.structured.select.resolve_config`): ``minitron`` (mean |activation| after every norm,
            summed over norms) or ``rms`` (greedy: the channels whose removal changes the normalised outputs
            least, RMS rescaling included, with each norm's weight corrected in closed form for its new RMS).
        params: fraction of *all* parameters (embeddings included) to remove; the split among ``vocab`` (with a
            tokenizer that can be rewritten and calibration text), ``hidden``, ``heads`` and ``ffn`` is chosen among
            a few candidates by their loss per byte of held-out calibration text (:mod:`llmprune.structured.budget`).
            Excludes giving those.
        vocab: fraction of the vocabulary rows (embedding and LM head) removed, in [0, 1): the tokens
            ``vocab_text`` uses least go, and the tokenizer is rewritten so any text still tokenizes (byte-level
            or byte-fallback BPE; :mod:`llmprune.structured.vocab`). Runs after the other kinds.
        vocab_text: a text file or dataset name whose token counts choose the kept vocabulary; ``None``
            (default): the calibration text.
        single_unit_score: method ``single-unit`` only: how a unit's solo performance is scored: ``clusters``
            (default: label-cluster signal weighted by its SNR), ``snr`` (the seed's cluster / noise ratio),
            ``solo-loss`` (the next-token loss the unit's write alone removes, read through the final norm and
            LM head) or ``solo-loss-refit`` (the same for what the refit of the layer's other units cannot
            replace); see :mod:`llmprune.calibration.single_unit`.
    """

    heads: float = field(default=0.0, metadata={"help": "fraction of attention (query) heads removed, in [0, 1)"})
    ffn: float = field(default=0.0, metadata={"help": "fraction of FFN neurons removed, in [0, 1)"})
    layers: int = field(default=0, metadata={"help": "number of whole decoder blocks removed (Block Influence)"})
    experts: float = field(default=0.0, metadata={
        "help": "fraction of experts removed from every mixture-of-experts layer (routing mass with calibration "
                "data, else weight norm); --ffn then prunes neurons inside each expert"})
    method: str = field(default="obs", metadata={
        "help": "how heads and neurons are chosen (a registered method; quality and time: BENCHMARKS.md "
                "#structured-pruning-quality)"})
    allocation: Literal["uniform", "global", "error", "block_influence", "fisher"] | None = field(default=None, metadata={
        "help": "per-layer widths; default: the method's own (fisher for obs: each kind's total goes where the "
                "estimated loss increase is lowest; uniform for the scores: same widths everywhere, a standard "
                "config). global: normalised scores; error: the uniform setting's parameters go where the output "
                "error is lowest, heads and neurons competing; block_influence: ratios within +-spread"})
    attention_unit: Literal["auto", "group", "query"] = field(default="auto", metadata={
        "help": "group: remove whole KV groups; query: remove query heads evenly from every KV group; auto: chosen "
                "once per model (the recipe and the table name the unit used)"})
    rounding: Literal["error", "down", "up", "nearest"] = field(default="nearest", metadata={
        "help": "when --heads does not give whole units: the nearest valid count, down, up, or an error listing "
                "the valid ratios"})
    multiple_of: int = field(default=1, metadata={"help": "kept FFN widths rounded to a multiple of this"})
    min_keep: float = field(default=0.1, metadata={
        "help": "non-uniform allocations: smallest fraction of a layer's heads / neurons kept"})
    n_samples: int = field(default=128, metadata={"help": "calibration windows"})
    seq_len: int = field(default=1024, metadata={
        "help": "calibration window length (capped at the model's context)"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration windows and the Fisher's samples"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward pass"})
    bias_compensation: bool = field(default=False, metadata={
        "help": "add the removed units' mean output to the o_proj / down_proj bias (FLAP; refitted with obs or "
                "--reconstruct)"})
    reconstruct: bool = field(default=False, metadata={
        "help": "score methods: refit the projections that consume removed heads / neurons by least squares, "
                "layer by layer on the pruned model's activations (obs always refits)"})
    percdamp: float = field(default=0.01, metadata={"help": "refit damping, fraction of the mean Gram diagonal"})
    spread: float = field(default=0.1, metadata={"help": "block_influence allocation: ratios span 2 x spread"})
    fisher_samples: int = field(default=16, metadata={
        "help": "fisher allocation: calibration windows of its forward/backward pass"})
    fisher_diagonal: bool = field(default=False, metadata={
        "help": "fisher allocation: keep only the Fisher's diagonal (for very wide models)"})
    fisher_labels: Literal["data", "model"] = field(default="model", metadata={
        "help": "fisher allocation: next tokens sampled from the unpruned model (model: the true Fisher) or the "
                "calibration text's own (data: the empirical Fisher)"})
    hidden: float = field(default=0.0, metadata={
        "help": "fraction of hidden (embedding) channels removed everywhere: embeddings, norms, every projection "
                "of the residual stream, the LM head (Minitron); before --heads / --ffn"})
    hidden_method: str = field(default="minitron", metadata={
        "help": "how hidden channels are chosen (a registered hidden-channel criterion)"})
    params: float = field(default=0.0, metadata={
        "help": "fraction of ALL parameters (embeddings included) to remove, split among --vocab, --hidden, --heads "
                "and --ffn by the held-out loss of a few candidates (give it alone)"})
    vocab: float = field(default=0.0, metadata={
        "help": "fraction of vocabulary rows (embedding and LM head) removed: the tokens the calibration text (or "
                "--vocab-text) uses least go; the tokenizer is rewritten and still tokenizes any text"})
    vocab_text: str | None = field(default=None, metadata={
        "help": "text file or dataset name whose token counts choose the kept vocabulary",
        "default_help": "the calibration text"})
    single_unit_score: SingleUnitScore = field(default=get_args(SingleUnitScore)[0], metadata={
        "help": "method single-unit only: clusters (label-cluster signal x SNR/(1+SNR)), snr (the seed's "
                "cluster/noise ratio), solo-loss (the next-token loss the unit's write alone removes through the "
                "final norm and LM head) or solo-loss-refit (the same for what a refit of the layer's other "
                "units cannot replace)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("heads", "ffn", "experts", "hidden", "params", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name}={value!r} is out of range: it is the fraction removed and must be in [0, 1)")
        if not isinstance(self.layers, int) or self.layers < 0:
            raise ValueError(f"layers={self.layers!r} must be a non-negative number of blocks to remove")
        choices = {"allocation": (None, "uniform", "global", "error", "block_influence", "fisher"),
                   "attention_unit": ("auto", "group", "query"), "rounding": ("error", "down", "up", "nearest"),
                   "fisher_labels": ("data", "model"), "single_unit_score": get_args(SingleUnitScore)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of "
                                 f"{', '.join(a for a in allowed if a is not None)}")
        if not isinstance(self.hidden_method, str) or not self.hidden_method:
            raise ValueError(f"hidden_method={self.hidden_method!r} must name a hidden-channel criterion")
        if self.multiple_of < 1:
            raise ValueError("multiple_of must be >= 1")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError("min_keep must be in (0, 1]")
        for name in ("n_samples", "seq_len", "batch_size", "fisher_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp={self.percdamp!r} must be in [0, 1)")
        if not 0.0 <= self.spread <= 0.5:
            raise ValueError(f"spread={self.spread!r} must be in [0, 0.5]")
        if self.params > 0 and (self.hidden or self.heads or self.ffn or self.layers or self.experts or self.vocab):
            raise ValueError("params chooses hidden / heads / ffn itself: give params alone (no hidden, heads, ffn, "
                             "layers, experts or vocab)")
        if self.vocab_text is not None and (not isinstance(self.vocab_text, str) or not self.vocab_text.strip()):
            raise ValueError(f"vocab_text={self.vocab_text!r} must name a text file or dataset")


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
    #: vocabulary rows kept (original token ids, ascending; ``None``: vocabulary untouched), applied last
    kept_tokens: list[int] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunePlan":
        return cls(layers=[LayerPlan.from_dict(x) for x in data.get("layers", [])],
                   removed_layers=list(data.get("removed_layers", [])),
                   kept_hidden=data.get("kept_hidden"), hidden_norm_scales=data.get("hidden_norm_scales"),
                   kept_tokens=data.get("kept_tokens"))

    @property
    def kept_layers(self) -> list[int]:
        return [i for i in range(len(self.layers)) if i not in set(self.removed_layers)]
