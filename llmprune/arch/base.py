"""What an architecture adapter tells the rest of llmprune.

An adapter describes, for one model family, *where* each prunable unit lives inside a decoder layer:
which rows or columns of which projection weights form an attention head, a key/value head and an FFN
neuron. Everything else (scoring, selection, surgery, masking) is generic code working on these
descriptions, so adding a family is one adapter file.

A unit's weights are described by :class:`Slot` objects. A slot says "unit ``u`` of this kind owns the
indices ``offset + u*stride + [0, width)`` along the input or output dimension of ``module``". Fused
projections (Phi-3 ``qkv_proj``, GPT-NeoX interleaved ``query_key_value``) are just several slots on the
same module with different offsets and strides.

Example::

    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    attn = adapter.attention(layer)      # AttentionSpec(num_heads=8, num_kv_heads=4, head_dim=32, ...)
    ffn = adapter.ffn(layer)             # FFNSpec(num_neurons=768, slots=...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import nn

__all__ = [
    "Slot",
    "AttentionSpec",
    "FFNSpec",
    "ExpertParam",
    "ExpertsSpec",
    "ArchAdapter",
    "StandardEquivalent",
    "HiddenSite",
    "weight_matrix",
    "set_weight_matrix",
]


@dataclass(frozen=True)
class Slot:
    """The indices of one unit inside one weight.

    ``dim="out"`` means output features (rows of ``nn.Linear.weight``), ``dim="in"`` input features.
    Unit ``u`` owns ``offset + u * stride + arange(width)``; ``stride`` defaults to ``width``.

    Blocked layouts (Falcon's ``new_decoder_architecture`` packs ``[q_0 .. q_{g-1}, k, v]`` per KV group)
    set ``group``: unit ``u`` then owns ``offset + (u // group) * group_stride + (u % group) * stride
    + arange(width)``.
    """

    module: nn.Module
    dim: Literal["out", "in"]
    width: int = 1
    offset: int = 0
    stride: int | None = None
    group: int | None = None
    group_stride: int = 0

    def indices(self, units: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Flat indices along ``dim`` owned by ``units`` (in unit order)."""
        # Index math always on CPU: models are built under a meta-device context during from_pretrained.
        units = torch.as_tensor(units, dtype=torch.long, device="cpu").reshape(-1, 1)
        step = self.stride if self.stride is not None else self.width
        if self.group:
            start = (units // self.group) * self.group_stride + (units % self.group) * step
        else:
            start = units * step
        return (self.offset + start + torch.arange(self.width, device="cpu").reshape(1, -1)).reshape(-1)


@dataclass
class AttentionSpec:
    """Attention geometry of one layer and the slots of its query heads and key/value heads.

    Query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)`` (standard GQA/MQA order).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_slots: list[Slot]  # per query head: q rows, o columns (and fused equivalents)
    kv_slots: list[Slot]  # per key/value head: k rows, v rows
    output: Slot  # the slot through which head outputs enter the residual (o_proj columns); used for masking

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class FFNSpec:
    """Width of the layer's MLP and the slots of one neuron (gate/up rows, down column)."""

    num_neurons: int
    slots: list[Slot]
    output: Slot  # the down projection's input column; used for masking


class ExpertView:
    """One expert's ``[out, in]`` matrix inside a batched ``[num_experts, out, in]`` parameter.

    It quacks like a module with a ``weight`` (read live from the owner), so :class:`Slot`, the criteria
    and the calibration statistics (keyed by it) work on one expert unchanged. Views are cached on the
    owner, so the same ``(param, expert)`` is always the same object. Surgery never goes through a view:
    batched parameters are cut for all experts at once (:func:`llmprune.arch.surgery.prune_experts`).
    """

    def __init__(self, owner: nn.Module, name: str, expert: int) -> None:
        self.owner, self.name, self.expert = owner, name, expert

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.name)[self.expert]

    def __repr__(self) -> str:
        return f"ExpertView({type(self.owner).__name__}.{self.name}[{self.expert}])"


def expert_view(owner: nn.Module, name: str, expert: int) -> ExpertView:
    cache = owner.__dict__.setdefault("_llmprune_expert_views", {})  # plain dict: not a registered submodule
    key = (name, expert)
    if key not in cache:
        cache[key] = ExpertView(owner, name, expert)
    return cache[key]


@dataclass(frozen=True)
class ExpertParam:
    """A batched expert parameter ``module.<name>`` of shape ``[num_experts, out, in]``.

    Expert ``e``'s matrix is ``[out, in]``; neuron ``n`` of an expert owns, along ``dim``, the indices
    ``offset + n`` for each offset in ``offsets`` (fused gate/up: ``offsets=(0, I)``).
    """

    module: nn.Module
    name: str
    dim: Literal["out", "in"]
    offsets: tuple[int, ...] = (0,)

    def slots(self, expert: int) -> list[Slot]:
        view = expert_view(self.module, self.name, expert)
        return [Slot(view, self.dim, 1, off) for off in self.offsets]  # type: ignore[arg-type]


@dataclass
class ExpertsSpec:
    """A mixture-of-experts block: ``num_experts`` experts of ``num_neurons`` each and a top-k router.

    ``params`` are sliced along the expert axis (axis 0) to remove experts and along their neuron
    ``dim`` to remove neurons (each expert keeps its own neuron set, the same count in every expert).
    ``router`` owns one output row per expert (its logit).
    """

    num_experts: int
    num_neurons: int
    top_k: int
    params: list[ExpertParam]
    router: Slot

    def neuron_slots(self, expert: int) -> list[Slot]:
        return [s for p in self.params for s in p.slots(expert)]

    def output(self, expert: int) -> Slot:
        """Expert ``expert``'s down-projection input columns (where its neurons enter; used for masking)."""
        down = [p for p in self.params if p.dim == "in"][-1]
        return down.slots(expert)[0]


@dataclass(frozen=True)
class HiddenSite:
    """One parameter axis indexed by the residual stream's (hidden) channels.

    ``kind``: ``"embedding"`` (an ``nn.Embedding``'s columns: tokens, positions), ``"norm"`` (a LayerNorm /
    RMSNorm weight and bias over the hidden channels), ``"in"`` (a projection *reading* the stream: its input
    columns), ``"out"`` (a projection *writing* it: output rows and bias), ``"param"`` (axis ``axis`` of the raw
    parameter ``module.<name>``: batched experts). Tied parameters (an LM head sharing the embedding) appear
    once per module and are cut once.
    """

    module: nn.Module
    kind: Literal["embedding", "norm", "in", "out", "param"]
    name: str = "weight"
    axis: int = 0


#: support-matrix wording (:attr:`ArchAdapter.standard_outputs`)
ALL_UNIFORM = "all"
NO_HEAD_PRUNING = "all but head-pruned"
HEADS_DIVIDING_HIDDEN = "all but heads not dividing hidden_size"


@dataclass(frozen=True)
class StandardEquivalent:
    """Another standard transformers family that computes *exactly* what this one does for some configs.

    Used when the family's own config class rejects a pruned shape (transformers 5 ``LlamaConfig`` wants
    ``hidden_size % num_attention_heads == 0``): the checkpoint is then saved as ``model_type`` instead, with
    the same weight names, so plain transformers loads it without llmprune.

    Attributes:
        model_type: the target family (e.g. ``"mistral"``).
        require: fields only the source family has, with the values under which the two compute the same
            (e.g. ``attention_bias=False``); any other value means there is no exact equivalent.
        set: fields only the target family has, set so it computes like the source (``sliding_window=None``).
    """

    model_type: str
    require: dict[str, Any]
    set: dict[str, Any]

    def applies_to(self, config: Any) -> bool:
        return all(getattr(config, k, v) == v for k, v in self.require.items())


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` matrix (transposing GPT-2 style ``Conv1D``). A peft LoRA
    wrapper reads its base layer's weight (with the adapter merged, the effective weight)."""
    module = getattr(module, "base_layer", module)
    w = module.weight
    return w.t() if _is_conv1d(module) else w


def set_weight_matrix(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Store an ``[out, in]`` matrix back in the module's own layout."""
    data = w_out_in.t() if _is_conv1d(module) else w_out_in
    module.weight = nn.Parameter(data.contiguous(), requires_grad=module.weight.requires_grad)


def heads_span_hidden(adapter: "ArchAdapter", model: nn.Module) -> bool:
    """True when every layer's ``num_heads * head_dim == hidden_size`` (no head was pruned), i.e. a
    config-derived ``head_dim = hidden_size // num_heads`` is still right."""
    hidden = model.config.hidden_size
    for layer in adapter.decoder_layers(model):
        attn = adapter.attention(layer)
        if attn is not None and attn.num_heads * attn.head_dim != hidden:
            return False
    return True


#: per-layer-width checkpoints carry ``model_type = PER_LAYER_PREFIX + <original model_type>``
PER_LAYER_PREFIX = "llmprune_"


def base_model_type(model_type: str) -> str:
    """``llmprune_llama`` -> ``llama``; other names unchanged."""
    return model_type[len(PER_LAYER_PREFIX):] if model_type.startswith(PER_LAYER_PREFIX) else model_type


def base_model_type_of(config: Any) -> str:
    """``config.model_type`` without the per-layer prefix (``llmprune_gemma2`` -> ``gemma2``)."""
    return base_model_type(str(getattr(config, "model_type", "")))


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D stores weight as [in, out]; recognised by name to avoid importing GPT-2 code.
    return type(module).__name__ == "Conv1D"


class ArchAdapter:
    """Base class of architecture adapters. Subclasses set ``model_types`` and implement the hooks.

    Adapters are registered with :func:`llmprune.arch.register_adapter` and looked up by
    ``config.model_type``.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: families in the support matrix, e.g. "Llama"; one adapter can serve several model types
    family: ClassVar[str] = ""
    #: prunable unit kinds this adapter supports, for the support matrix
    units: ClassVar[tuple[str, ...]] = ("heads", "kv_groups", "neurons", "layers")
    #: config attribute names holding the uniform widths
    heads_attr: ClassVar[str] = "num_attention_heads"
    kv_heads_attr: ClassVar[str | None] = "num_key_value_heads"
    ffn_attr: ClassVar[str] = "intermediate_size"
    layers_attr: ClassVar[str] = "num_hidden_layers"
    #: per-layer config lists that must follow layer removal (e.g. Gemma's ``layer_types``)
    per_layer_config_lists: ClassVar[tuple[str, ...]] = ("layer_types",)
    #: source model_type -> an exactly equivalent standard family for configs its own class rejects
    standard_equivalents: ClassVar[dict[str, StandardEquivalent]] = {}
    #: model_type -> which *uniform* outputs plain transformers loads (support matrix; checked by
    #: tests/test_support_matrix.py). Unlisted types: every uniform output. Per-layer widths always need llmprune.
    standard_outputs: ClassVar[dict[str, str]] = {}
    #: why this family's hidden size cannot be pruned (``None``: it can; :meth:`hidden_sites` lists the axes)
    hidden_refusal: ClassVar[str | None] = ("its modules derive the head size as hidden_size // num_heads and its config "
                                            "has no head_dim field, so a narrower hidden_size would change every head")
    #: model_type -> the offset of its norms' scale: Gemma's RMSNorm multiplies by ``(1 + w)``
    norm_weight_offsets: ClassVar[dict[str, float]] = {}

    # ---- structure -------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The ``nn.ModuleList`` of decoder blocks."""
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> AttentionSpec | None:
        """Attention geometry and slots of ``layer`` (``None`` if the layer has no prunable attention)."""
        raise NotImplementedError

    def ffn(self, layer: nn.Module) -> FFNSpec | None:
        """FFN width and neuron slots of ``layer``."""
        raise NotImplementedError

    # ---- hooks after surgery ---------------------------------------------------------------------
    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update module attributes after heads were sliced (e.g. ``num_key_value_groups``)."""

    def set_ffn_shape(self, layer: nn.Module, num_neurons: int) -> None:
        """Update module attributes after neurons were sliced."""

    # ---- mixture of experts (optional) -------------------------------------------------------------
    def experts(self, layer: nn.Module) -> ExpertsSpec | None:
        """The layer's mixture-of-experts block (``None``: no experts; the default)."""
        return None

    def set_experts_shape(self, layer: nn.Module, num_experts: int, num_neurons: int) -> None:
        """Update module attributes after experts or expert neurons were sliced."""

    def calibration_hooks(self, layer: nn.Module, stats: Any) -> list[Any]:
        """Extra hooks gathering statistics the slot pre-hooks cannot see (e.g. per-expert inputs of
        batched experts, router statistics) into ``stats`` (a :class:`~llmprune.calibration.calibrate.LayerStats`);
        returns the hook handles. Default: none."""
        return []

    def set_layer_index(self, layer: nn.Module, index: int) -> None:
        """Renumber a layer after layer removal (KV-cache slot, sliding-window type)."""
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index

    # ---- hidden dimension (embedding channels) ---------------------------------------------------------
    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        """Norms after the last block (before the LM head)."""
        norm = getattr(getattr(model, "model", model), "norm", None)
        return [norm] if norm is not None else []

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        """A block's hidden-sized norms: direct children named ``*Norm`` (per-head q/k norms sit deeper)."""
        return [m for m in layer.children() if type(m).__name__.endswith("Norm")
                and getattr(m, "weight", None) is not None and m.weight.ndim == 1]

    def hidden_sites(self, model: nn.Module) -> list[HiddenSite]:
        """Every parameter axis indexed by the residual stream, embeddings to LM head, derived from the unit
        slots: a slot on output rows reads the stream (q/k/v, gate/up), one on input columns writes it (o, down)."""
        sites = [HiddenSite(m, "embedding") for m in self.hidden_embeddings(model)]
        seen: set[int] = set()

        def add(module: Any, kind: str, name: str = "weight", axis: int = 0) -> None:
            key = (id(module), name)
            if key not in seen:
                seen.add(key)
                sites.append(HiddenSite(module, kind, name, axis))  # type: ignore[arg-type]

        for layer in self.decoder_layers(model):
            for norm in self.layer_norms(layer):
                add(norm, "norm")
            slots: list[Slot] = []
            attn, ffn, moe = self.attention(layer), self.ffn(layer), self.experts(layer)
            if attn is not None:
                slots += attn.q_slots + attn.kv_slots
            if ffn is not None:
                slots += ffn.slots
            for slot in slots:
                add(slot.module, "in" if slot.dim == "out" else "out")
            if moe is not None:
                add(moe.router.module, "in")
                for p in moe.params:  # [experts, out, in]: readers cut axis 2, writers axis 1
                    add(p.module, "param", p.name, 2 if p.dim == "out" else 1)
        for norm in self.final_norms(model):
            add(norm, "norm")
        if getattr(model, "get_output_embeddings", lambda: None)() is not None:
            add(model.get_output_embeddings(), "in")
        return sites

    def hidden_embeddings(self, model: nn.Module) -> list[nn.Module]:
        """Embeddings whose columns are hidden channels (token embeddings; position embeddings where added)."""
        return [model.get_input_embeddings()]

    def norm_weight_offset(self, config: Any) -> float:
        """``c`` where the family's norm scales by ``(c + w)`` (Gemma 1, else 0)."""
        return float(self.norm_weight_offsets.get(base_model_type_of(config), 0.0))

    def rescale_embeddings(self, model: nn.Module, hidden_size: int) -> float:
        """Give scaled embeddings (Gemma) the scale a ``hidden_size`` model builds; returns old / new (1.0: none)."""
        return 1.0

    def set_hidden_size(self, config: Any, hidden_size: int) -> None:
        """Write the pruned hidden size into ``config``, ``head_dim`` kept explicit (it was derived from it)."""
        if self.hidden_refusal:
            raise ValueError(f"{self.family or type(self).__name__}: the hidden size cannot be pruned: {self.hidden_refusal}")
        config.head_dim, config.hidden_size = self.head_dim(config), hidden_size  # head_dim read before the change

    # ---- config ----------------------------------------------------------------------------------
    def standard_config_ok(self, model: nn.Module) -> bool:
        """Whether the family's standard config, given the model's (uniform) widths, rebuilds its shapes.

        Families whose modules derive ``head_dim = hidden_size // num_heads`` (GPT-2, OPT, GPT-NeoX, Falcon)
        return ``False`` once heads were pruned; their checkpoints then use the per-layer classes.
        """
        return True

    def pin_head_dim(self, config: Any) -> None:
        """Make ``head_dim`` explicit in a per-layer config (the width fields stay upper bounds)."""
        if self.kv_heads_attr is not None:
            config.head_dim = self.head_dim(config)

    def head_dim(self, config: Any) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // getattr(config, self.heads_attr)

    def set_uniform_config(self, config: Any, num_heads: int, num_kv_heads: int, num_neurons: int) -> None:
        """Write uniform widths into ``config`` (head_dim is made explicit, so heads can change)."""
        if hasattr(config, "head_dim") or self.kv_heads_attr is not None:
            config.head_dim = self.head_dim(config)
        setattr(config, self.heads_attr, num_heads)
        if self.kv_heads_attr is not None:
            setattr(config, self.kv_heads_attr, num_kv_heads)
        setattr(config, self.ffn_attr, num_neurons)

    def bias_flags(self, config: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
        """For bias compensation on a family whose output projections have no bias: per unit kind
        (``"attention"``, ``"ffn"``), the config flag that turns biases on and the layer-relative names of
        every module that then carries one. Empty: biases cannot be declared in the config."""
        return {}

    def set_uniform_widths(self, config: Any, widths: dict[str, int]) -> None:
        """Write one layer's widths (``layer_widths`` entry) into ``config``; adapters with extra units
        (experts) override this."""
        self.set_uniform_config(config, widths["heads"], widths["kv_heads"], widths["neurons"])

    def num_layers(self, config: Any) -> int:
        return int(getattr(config, self.layers_attr))

    def set_num_layers(self, config: Any, kept: list[int]) -> None:
        """Shrink ``num_hidden_layers`` and per-layer config lists to the kept layers."""
        for name in self.per_layer_config_lists:
            values = getattr(config, name, None)
            if isinstance(values, (list, tuple)) and len(values) == self.num_layers(config):
                setattr(config, name, [values[i] for i in kept])
        setattr(config, self.layers_attr, len(kept))

    # ---- support matrix --------------------------------------------------------------------------
    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"family": cls.family or cls.__name__, "model_types": list(cls.model_types), "units": list(cls.units),
                "standard_outputs": {t: cls.standard_outputs.get(t, ALL_UNIFORM) for t in cls.model_types}}

