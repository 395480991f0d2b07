"""Shared setup of the kernel tests: interpreter on CPU, device, per-dtype tolerances, skip markers.

Tolerances (kernel and reference both accumulate in fp32; differences come from summation order and
the final rounding): fp32 atol=rtol=1e-4, fp16 atol=rtol=1e-2, bf16 (GPU only) atol=rtol=3e-2.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must happen before the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmprune.kernels as tk  # noqa: E402
from llmprune.kernels._common import interpreter_active  # noqa: E402

CUDA = torch.cuda.is_available()
KERNELS_RUN = tk.HAS_TRITON and (CUDA or interpreter_active())
DEV = "cpu" if interpreter_active() or not CUDA else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="needs Triton with CUDA or TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not CUDA or interpreter_active(), reason="needs CUDA (not the interpreter)")
