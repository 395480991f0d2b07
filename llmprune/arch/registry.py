"""Registry of architecture adapters, keyed by ``config.model_type``.

Example::

    from llmprune.arch import get_adapter
    adapter = get_adapter(model)          # raises UnsupportedArchitectureError for unknown families
"""

from __future__ import annotations

from typing import Any

from .base import PER_LAYER_PREFIX, ArchAdapter, base_model_type

__all__ = ["register_adapter", "get_adapter", "supported_model_types", "registered_adapters",
           "UnsupportedArchitectureError", "PER_LAYER_PREFIX", "base_model_type"]

_ADAPTERS: dict[str, ArchAdapter] = {}


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter."""


def register_adapter(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: register an adapter for each of its ``model_types``."""
    instance = cls()
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has adapter {type(_ADAPTERS[model_type]).__name__}")
        _ADAPTERS[model_type] = instance
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def registered_adapters() -> list[ArchAdapter]:
    """Distinct adapters in registration order."""
    seen: dict[int, ArchAdapter] = {}
    for adapter in _ADAPTERS.values():
        seen.setdefault(id(adapter), adapter)
    return list(seen.values())


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """The adapter for a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(f"cannot tell the architecture of {type(model_or_config).__name__}: no config.model_type")
    adapter = _ADAPTERS.get(base_model_type(model_type))
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported by llmprune. Supported model types: "
            f"{', '.join(supported_model_types())}. Adding one is a single adapter file in llmprune/arch/."
        )
    return adapter
