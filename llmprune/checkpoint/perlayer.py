"""Checkpoints whose layers have different widths, loadable with plain ``from_pretrained``.

Standard transformers configs hold one ``num_attention_heads`` / ``intermediate_size`` for all layers.
When global allocation gives layers different widths, llmprune saves:

- ``model_type = "llmprune_<type>"`` (e.g. ``llmprune_llama``) and ``architectures = ["Pruned<Class>"]``;
- ``llmprune_layer_widths``: one ``{"heads", "kv_heads", "neurons"}`` entry per layer;
- the original width fields, which are upper bounds of every layer's widths.

``import llmprune`` registers, for each supported family, a config subclass with ``AutoConfig``; the
family's model subclasses are registered with the Auto model classes when its first such config is built
(so the import loads no modeling file). Their ``__init__`` builds the standard model and then shrinks each layer to
its saved widths with the same surgery code used for pruning, so weights load by name with no pickle
and no ``trust_remote_code``. We chose registration over an exported modeling file because exported
code would require ``trust_remote_code=True`` and would have to be kept in sync with every family.

Example::

    import llmprune
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("pruned-global/")   # per-layer widths restored
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..arch import PER_LAYER_PREFIX, ArchAdapter, base_model_type, get_adapter, registered_adapters
from ..core.config import LayerPlan
from ..arch.surgery import layer_widths, prune_layer

__all__ = ["WIDTHS_KEY", "set_config_widths", "register_per_layer_classes", "register_per_layer_configs", "per_layer_config_class", "shrink_to_config"]

WIDTHS_KEY = "llmprune_layer_widths"

_AUTO_CLASS_NAMES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
)
_CONFIG_CLASSES: dict[str, type] = {}
_MODEL_CLASSES: dict[type, type] = {}  # base model class -> per-layer subclass
_MODELS_REGISTERED: set[str] = set()  # base model types whose model classes are registered


def per_layer_config_class(model_type: str) -> type:
    """The registered per-layer config class for a base ``model_type`` (its model classes registered too)."""
    model_type = base_model_type(model_type)
    register_per_layer_classes([model_type])
    return _CONFIG_CLASSES[model_type]


def _validate_pruned(self: Any) -> None:
    """Run the family's validators, replacing the architecture check by one that honours ``head_dim``."""
    for validator in getattr(type(self).__mro__[1], "__class_validators__", []):
        if validator.__name__ != "validate_architecture":
            validator(self)
    heads, kv = getattr(self, "num_attention_heads", None), getattr(self, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")


def _make_model_class(base_cls: type, config_cls: type) -> type:
    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        base_cls.__init__(self, config, *args, **kwargs)
        shrink_to_config(self)

    return type(f"Pruned{base_cls.__name__}", (base_cls,), {"__init__": __init__, "config_class": config_cls,
                                                            "__module__": __name__})


def _make_config_class(base_cfg: type, model_type: str) -> type:
    def __post_init__(self, *args: Any, **kwargs: Any) -> None:
        base_cfg.__post_init__(self, *args, **kwargs)
        # The model classes are registered when the first such config is built (from_pretrained reads the
        # config before it looks up the model class), so `import llmprune` imports no modeling file. A hook
        # in __post_init__, not __init__: transformers makes each config subclass a dataclass whose generated
        # __init__ runs our `validate`; a custom __init__ would run the base family's validation instead.
        _register_models(model_type)

    return type(f"Pruned{base_cfg.__name__}", (base_cfg,), {"model_type": PER_LAYER_PREFIX + model_type,
                                                           "__module__": __name__, "__post_init__": __post_init__,
                                                           "validate": _validate_pruned})


def register_per_layer_configs(model_types: list[str] | None = None) -> None:
    """Register the per-layer config classes with ``AutoConfig`` (idempotent; what ``import llmprune`` runs).

    Each family's model classes follow when its first per-layer config is built, or on
    :func:`register_per_layer_classes`.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_types is None:
        model_types = [t for a in registered_adapters() for t in a.model_types]
    for model_type in model_types:
        if model_type in _CONFIG_CLASSES or model_type not in CONFIG_MAPPING:
            continue
        cfg_cls = _make_config_class(CONFIG_MAPPING[model_type], model_type)
        AutoConfig.register(PER_LAYER_PREFIX + model_type, cfg_cls, exist_ok=True)
        _CONFIG_CLASSES[model_type] = cfg_cls


def register_per_layer_classes(model_types: list[str] | None = None) -> None:
    """Register per-layer config and model classes with transformers' Auto classes (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_types is None:
        model_types = [t for a in registered_adapters() for t in a.model_types]
    register_per_layer_configs(model_types)
    for model_type in model_types:
        if model_type in CONFIG_MAPPING:
            _register_models(model_type)


def _register_models(model_type: str) -> None:
    """Register ``Pruned<Class>`` for every Auto class the family has, with its weight conversions."""
    import transformers

    if model_type in _MODELS_REGISTERED:
        return
    _MODELS_REGISTERED.add(model_type)
    cfg_cls = _CONFIG_CLASSES[model_type]
    base_cfg = cfg_cls.__mro__[1]
    _inherit_weight_conversions(model_type, PER_LAYER_PREFIX + model_type)
    for auto_name in _AUTO_CLASS_NAMES:
        auto = getattr(transformers, auto_name)
        if base_cfg not in auto._model_mapping:
            continue
        base_model = auto._model_mapping[base_cfg]
        model_cls = _MODEL_CLASSES.get(base_model) or _make_model_class(base_model, cfg_cls)
        _MODEL_CLASSES[base_model] = model_cls
        _inherit_weight_conversions(base_model.__name__, model_cls.__name__)
        auto.register(cfg_cls, model_cls, exist_ok=True)


def _inherit_weight_conversions(source: str, target: str) -> None:
    """Give a per-layer type or class the checkpoint key conversions transformers keys by ``source``.

    transformers 5 renames and fuses checkpoint keys on load (and reverses it on save) through mappings
    looked up by model class name or ``model_type`` (``GPTNeoXForCausalLM``: ``embed_out`` -> ``lm_head``;
    ``mixtral``/``qwen3_moe``: per-expert weights -> batched experts). Our ``Pruned<Class>`` /
    ``llmprune_<type>`` names are not in those tables, so without this a checkpoint written by
    ``save_pretrained`` reloaded with a randomly initialised output head or experts (issue #10).
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - transformers without conversion mappings
        return
    mapping = get_checkpoint_conversion_mapping(source)
    if mapping is not None and get_checkpoint_conversion_mapping(target) is None:
        register_checkpoint_conversion_mapping(target, mapping)


def _first_heads(widths: dict[str, int], group: int) -> tuple[list[int], list[int]]:
    """Kept (query, kv) heads that shrink a freshly built layer to ``widths`` (first heads of each group)."""
    kv, per_group = widths["kv_heads"], widths["heads"] // widths["kv_heads"]
    return [k * group + j for k in range(kv) for j in range(per_group)], list(range(kv))


def shrink_to_config(model: nn.Module) -> None:
    """Shrink a freshly built model's layers to ``config.llmprune_layer_widths`` (no-op if absent)."""
    widths = getattr(model.config, WIDTHS_KEY, None)
    if not widths:
        return
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    if len(widths) != len(layers):
        raise ValueError(f"config has {len(widths)} layer widths for {len(layers)} layers")
    for layer, w in zip(layers, widths):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        plan = LayerPlan()
        if attn is not None and (w["heads"], w["kv_heads"]) != (attn.num_heads, attn.num_kv_heads):
            plan.kept_heads, plan.kept_kv_heads = _first_heads(w, attn.group_size)
        if ffn is not None and w["neurons"] != ffn.num_neurons:
            plan.kept_neurons = list(range(w["neurons"]))
        moe = adapter.experts(layer) if "experts" in w else None
        if moe is not None:
            if w["experts"] != moe.num_experts:
                plan.kept_experts = list(range(w["experts"]))
            if w["expert_neurons"] != moe.num_neurons:
                plan.kept_expert_neurons = [list(range(w["expert_neurons"]))] * moe.num_experts
        prune_layer(adapter, layer, plan)


def set_config_widths(model: nn.Module, adapter: ArchAdapter | None = None) -> None:
    """Describe the model's current widths in its config.

    Uniform widths give a standard config (plain transformers loads it) unless the installed
    transformers' own config validation rejects it: transformers 5.x ``LlamaConfig``/``Gemma*Config``
    demand ``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim``
    (huggingface/transformers#46082), or when the adapter says a standard config cannot rebuild the
    shapes (``ArchAdapter.standard_config_ok``: GPT-2, OPT, GPT-NeoX and Falcon derive head_dim from
    hidden_size // num_heads). A rejected uniform config is saved as an exactly equivalent standard family when
    the adapter declares one (``ArchAdapter.standard_equivalents``: a head-pruned Llama becomes a Mistral).
    Otherwise, and for per-layer widths, the model uses llmprune's registered classes
    (``model_type = "llmprune_<type>"``), which need ``import llmprune`` before loading.
    """
    adapter = adapter or get_adapter(model)
    config = model.config
    widths = layer_widths(model, adapter)
    # A width of 0 means "this layer has no such unit" (e.g. no dense MLP in a mixture-of-experts layer),
    # so layers are uniform when every kind has at most one non-zero width.
    values = {k: {w[k] for w in widths if w.get(k)} for k in (widths[0] if widths else {})}
    uniform = all(len(v) <= 1 for v in values.values())
    common = {k: next(iter(v)) if v else 0 for k, v in values.items()}
    uniform = uniform and (not widths or adapter.standard_config_ok(model))
    if uniform:
        if widths:
            adapter.set_uniform_widths(config, common)
        setattr(config, WIDTHS_KEY, None)
    else:
        adapter.pin_head_dim(config)
        setattr(config, WIDTHS_KEY, widths)
    model_type = base_model_type(config.model_type)
    standard_cfg = _base_config_class(model_type)
    if uniform and _validates(standard_cfg, config):
        _swap_classes(model, standard_cfg, _base_model_class(type(model)), model_type)
    elif uniform and _become_standard_equivalent(model, adapter, model_type):
        pass
    else:
        _swap_classes(model, per_layer_config_class(model_type), _per_layer_model_class(type(model)),
                      PER_LAYER_PREFIX + model_type)


def _become_standard_equivalent(model: nn.Module, adapter: ArchAdapter, model_type: str) -> bool:
    """Turn ``model`` (uniform widths) into its adapter's exactly equivalent standard family, if any.

    The config object is rewritten in place (submodules keep a reference to it) as the target family's
    config class, built from the source's values: source-only fields must hold the adapter's neutral
    values, target-only fields are set as the adapter says. Returns ``False`` (nothing changed) when there
    is no equivalent, a source-only field differs, or the target's own validation rejects the result.
    """
    import dataclasses

    equivalent = adapter.standard_equivalents.get(model_type)
    config = model.config
    if equivalent is None or not equivalent.applies_to(config):
        return False
    target_cfg = _base_config_class(equivalent.model_type)
    data = {k: v for k, v in config.to_dict().items()
            if k not in equivalent.require and k not in ("model_type", "architectures", "transformers_version")}
    data.update(equivalent.set)
    if dataclasses.is_dataclass(target_cfg):  # drop None-valued bookkeeping the target does not know
        known = {f.name for f in dataclasses.fields(target_cfg)}
        data = {k: v for k, v in data.items() if k in known or v is not None}
    try:
        new = target_cfg(**data)
    except (TypeError, ValueError):
        return False
    if not _validates(target_cfg, new):
        return False
    target_model = _equivalent_model_class(type(model), _base_config_class(model_type), target_cfg)
    if target_model is None:
        return False
    private = {k: v for k, v in vars(config).items() if k.startswith("_")}  # e.g. the attention implementation
    config.__class__ = target_cfg
    config.__dict__.clear()
    config.__dict__.update(new.__dict__)
    config.__dict__.update(private)
    model.__class__ = target_model
    return True


def _equivalent_model_class(model_cls: type, source_cfg: type, target_cfg: type) -> type | None:
    """The target family's class for the same head as ``model_cls`` (CausalLM -> CausalLM, ...)."""
    import transformers

    base = _base_model_class(model_cls)
    for auto_name in _AUTO_CLASS_NAMES:
        mapping = getattr(transformers, auto_name)._model_mapping
        if source_cfg in mapping and mapping[source_cfg] is base and target_cfg in mapping:
            return mapping[target_cfg]
    return None


def _base_config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def _validates(config_cls: type, config: Any) -> bool:
    validate = getattr(config_cls, "validate", None)
    if validate is None:
        return True
    try:
        validate(config)
    except Exception as exc:  # huggingface_hub's StrictDataclassClassValidationError is no ValueError
        if isinstance(exc, (ValueError, TypeError)) or type(exc).__name__.startswith("StrictDataclass"):
            return False
        raise
    return True


def _base_model_class(cls: type) -> type:
    for base, pruned in _MODEL_CLASSES.items():
        if pruned is cls:
            return base
    return cls


def _per_layer_model_class(cls: type) -> type:
    base = _base_model_class(cls)
    if base not in _MODEL_CLASSES:
        raise ValueError(f"{base.__name__} has no per-layer variant registered with llmprune")
    return _MODEL_CLASSES[base]


def _swap_classes(model: nn.Module, config_cls: type, model_cls: type, model_type: str) -> None:
    # The per-layer classes are plain subclasses without new state, so switching __class__ is safe and
    # makes save_pretrained write the right model_type / architectures.
    model.config.__class__ = config_cls
    if "model_type" in vars(model.config):
        model.config.model_type = model_type
    model.__class__ = model_cls
