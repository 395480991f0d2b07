"""Kernel-backed sparse modules and model conversion.

``use_kernels(model, KernelConfig(...))`` replaces target nn.Linear layers with
``ActSparseLinear`` (dynamic activation sparsity) or ``Sparse24Linear`` (2:4 compressed weights),
and optionally SwiGLU MLPs with ``GatherSwiGLUMLP`` (static/dynamic neuron subsets).
``save_compressed`` / ``load_compressed`` store the compressed format (safetensors + JSON, see ``io``).
On CUDA the modules call the Triton kernels in ``llmprune.kernels``; elsewhere they use the PyTorch
references and warn once.
"""
from .io import load_compressed, save_compressed
from .modules import (
    ActSparseLinear,
    GatherSwiGLUMLP,
    Sparse24Linear,
    get_backend,
    reset_fallback_warning,
    set_backend,
)
from .convert import DEFAULT_TARGETS, KernelConfig, calibrate_thresholds, find_targets
from .use import use_kernels

__all__ = [
    "ActSparseLinear",
    "Sparse24Linear",
    "GatherSwiGLUMLP",
    "KernelConfig",
    "use_kernels",
    "calibrate_thresholds",
    "find_targets",
    "DEFAULT_TARGETS",
    "save_compressed",
    "load_compressed",
    "set_backend",
    "get_backend",
    "reset_fallback_warning",
]
