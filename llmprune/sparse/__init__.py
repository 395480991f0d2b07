"""Kernel-backed sparse modules and model conversion.

``sparsify(model, SparsifyConfig(...))`` replaces target nn.Linear layers with
``ActSparseLinear`` (dynamic activation sparsity) or ``Sparse24Linear`` (2:4 compressed weights),
and optionally SwiGLU MLPs with ``GatherSwiGLUMLP`` (static/dynamic neuron subsets).
``save_sparse`` / ``load_sparse`` store the compressed format (safetensors + JSON, see ``io``).
On CUDA the modules call the Triton kernels in ``triton_kernels``; elsewhere they use the PyTorch
references and warn once.
"""
from .io import load_sparse, save_sparse
from .modules import (
    ActSparseLinear,
    GatherSwiGLUMLP,
    Sparse24Linear,
    get_backend,
    reset_fallback_warning,
    set_backend,
)
from .sparsify import DEFAULT_TARGETS, SparsifyConfig, calibrate_thresholds, find_targets, sparsify

__all__ = [
    "ActSparseLinear",
    "Sparse24Linear",
    "GatherSwiGLUMLP",
    "SparsifyConfig",
    "sparsify",
    "calibrate_thresholds",
    "find_targets",
    "DEFAULT_TARGETS",
    "save_sparse",
    "load_sparse",
    "set_backend",
    "get_backend",
    "reset_fallback_warning",
]
