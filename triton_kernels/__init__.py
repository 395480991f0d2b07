"""Triton kernels for sparse / pruned LLM layers at small batch (decode).

One file per op, each with a ``@triton.jit`` kernel, a host launcher and a plain-PyTorch
``*_reference`` used by the tests and as the CPU fallback:

* ``act_sparse_gemv``  - activation-sparse GEMV, fused threshold, skips weight rows of zeroed inputs
* ``sparse24_gemm``    - 2:4 compressed weight GEMV / small-batch GEMM (``compress_24`` layout)
* ``gather_swiglu``    - gathered-neuron SwiGLU MLP (dynamic FFN neuron skipping)

Importing this package never requires Triton: ``HAS_TRITON`` tells whether the launchers work;
the references, ``compress_24`` / ``decompress_24`` always do.
"""
from ._common import HAS_TRITON, MAX_BATCH
from .act_sparse_gemv import act_sparse_gemv, act_sparse_gemv_reference, threshold_activations
from .gather_swiglu import gather_swiglu, gather_swiglu_reference
from .sparse24_gemm import (
    compress_24,
    decompress_24,
    is_24_sparse,
    mask_24,
    sparse24_gemm,
    sparse24_gemm_reference,
)

__all__ = [
    "HAS_TRITON",
    "MAX_BATCH",
    "act_sparse_gemv",
    "act_sparse_gemv_reference",
    "threshold_activations",
    "sparse24_gemm",
    "sparse24_gemm_reference",
    "compress_24",
    "decompress_24",
    "mask_24",
    "is_24_sparse",
    "gather_swiglu",
    "gather_swiglu_reference",
]
