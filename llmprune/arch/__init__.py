"""Architecture adapters: where heads, KV groups, neurons and layers live in each model family (one adapter per
family, registered by ``model_type``), and the weight slicing that removes them
(``surgery``)."""

from .base import ArchAdapter, AttentionSpec, ExpertParam, ExpertsSpec, FFNSpec, Slot, set_weight_matrix, weight_matrix
from .registry import (
    PER_LAYER_PREFIX,
    UnsupportedArchitectureError,
    base_model_type,
    get_adapter,
    register_adapter,
    registered_adapters,
    supported_model_types,
)

# Importing the adapter modules registers them.
from . import bert, falcon, gpt2, gpt_neox, llama, moe, opt, phi3  # noqa: E402,F401

__all__ = [
    "ArchAdapter", "AttentionSpec", "FFNSpec", "ExpertParam", "ExpertsSpec", "Slot", "weight_matrix", "set_weight_matrix",
    "get_adapter", "register_adapter", "registered_adapters", "supported_model_types",
    "UnsupportedArchitectureError", "PER_LAYER_PREFIX", "base_model_type",
]
