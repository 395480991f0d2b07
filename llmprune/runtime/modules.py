"""Kernel-backed replacements for nn.Linear / the Llama SwiGLU MLP.

Each module runs its Triton kernel (``llmprune.kernels``) on CUDA for small batches (decode,
<= 8 rows per launch; more rows are chunked), a dense cuBLAS path on CUDA for large batches
(prefill) and the plain-PyTorch reference on CPU. The CPU fallback emits a single
``RuntimeWarning`` per process.

Backend selection (process-wide, ``set_backend``):
* ``"auto"`` (default): Triton on CUDA tensors, reference elsewhere (warns once);
* ``"kernel"``: always call the Triton launcher (on CPU this needs ``TRITON_INTERPRET=1``;
  used by the tests);
* ``"reference"``: always the PyTorch reference (no warning).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import llmprune.kernels as tk

__all__ = [
    "ActSparseLinear",
    "Sparse24Linear",
    "GatherSwiGLUMLP",
    "set_backend",
    "get_backend",
    "reset_fallback_warning",
]

_BACKENDS = ("auto", "kernel", "reference")
_backend = "auto"
_fallback_warned = False
#: rows above which CUDA uses a dense GEMM instead of the GEMV kernels (prefill).
KERNEL_MAX_ROWS = 8


def set_backend(name: str) -> None:
    """Select the compute path of all kernel-backed modules: 'auto', 'kernel' or 'reference'."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def reset_fallback_warning() -> None:
    """Re-arm the once-per-process CPU fallback warning (for tests)."""
    global _fallback_warned
    _fallback_warned = False


def _warn_fallback(x: torch.Tensor) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        why = "Triton is not installed" if not tk.HAS_TRITON else f"input is on {x.device.type}, not CUDA"
        warnings.warn(
            f"llmprune.runtime: {why}; sparse layers use the PyTorch reference path "
            "(same results, no speed-up). This warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )


def _path(x2: torch.Tensor) -> str:
    """'kernel', 'dense' (CUDA GEMM for many rows) or 'reference'."""
    if _backend == "reference":
        return "reference"
    if _backend == "kernel":
        return "kernel"
    if x2.is_cuda and tk.HAS_TRITON:
        return "kernel" if x2.shape[0] <= KERNEL_MAX_ROWS else "dense"
    if x2.is_cuda:  # CUDA without Triton
        _warn_fallback(x2)
        return "dense"
    _warn_fallback(x2)
    return "reference"


class _ThresholdMixin:
    """Keeps the per-layer ``threshold`` buffer as a CPU fp32 scalar whatever ``.to()`` /
    ``.half()`` / ``.cuda()`` is applied, so reading it never syncs the GPU nor loses precision."""

    def _apply(self, fn, recurse=True):
        saved = self._buffers.get("threshold")
        saved = None if saved is None else saved.detach().to("cpu", torch.float32).clone()
        out = super()._apply(fn, recurse)
        if saved is not None:
            self._buffers["threshold"] = saved
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "threshold"
        if key in state_dict:
            state_dict[key] = state_dict[key].detach().to("cpu", torch.float32).reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "threshold" in self._buffers:
            self._buffers["threshold"] = self._buffers["threshold"].detach().to("cpu", torch.float32)

    @property
    def threshold_value(self) -> float:
        return float(self.threshold)

    def set_threshold(self, t: float) -> None:
        t = float(t)
        if not (t >= 0):
            raise ValueError(f"threshold must be a non-negative float, got {t}")
        self._buffers["threshold"] = torch.tensor(t, dtype=torch.float32)


class ActSparseLinear(_ThresholdMixin, nn.Module):
    """Linear layer with TEAL-style dynamic activation sparsity.

    ``y = s(x) @ weight_t + bias`` with ``s(v) = v if |v| > threshold else 0``.
    State: ``weight_t`` [in, out] (the transposed nn.Linear weight, column-major for the kernel),
    optional ``bias`` [out], ``threshold`` fp32 scalar (kept on CPU)."""

    def __init__(self, in_features, out_features, bias=False, threshold=0.0, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_t = nn.Parameter(torch.empty(self.in_features, self.out_features, device=device, dtype=dtype),
                                     requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.set_threshold(threshold)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 0.0) -> "ActSparseLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold,
                device=w.device, dtype=w.dtype)
        m.weight_t.data.copy_(w.t())
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def dense_weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.weight_t.dtype:
            x2 = x2.to(self.weight_t.dtype)
        t = self.threshold_value
        path = _path(x2)
        if path == "kernel":
            y = tk.act_sparse_gemv(x2, self.weight_t, t)
        elif path == "dense":
            y = tk.threshold_activations(x2, t) @ self.weight_t
        else:
            y = tk.act_sparse_gemv_reference(x2, self.weight_t, t)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, threshold={self.threshold_value:.4g}"


class Sparse24Linear(_ThresholdMixin, nn.Module):
    """Linear layer with a 2:4 sparse weight stored compressed (see ``llmprune.kernels.sparse24_gemm``
    for the layout): ``values`` [out, in/2], ``meta`` uint8 [out, ceil(in/8)], optional ``bias``,
    and an activation ``threshold`` (0 = off) fused into the kernel."""

    def __init__(self, in_features, out_features, bias=False, threshold=0.0, device=None, dtype=None):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"Sparse24Linear needs in_features % 4 == 0, got {in_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.values = nn.Parameter(torch.zeros(self.out_features, self.in_features // 2, device=device, dtype=dtype),
                                   requires_grad=False)
        self.register_buffer("meta", torch.zeros(self.out_features, (self.in_features + 7) // 8,
                                                 dtype=torch.uint8, device=device))
        self.bias = (nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.set_threshold(threshold)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 0.0, strict: bool = False) -> "Sparse24Linear":
        """Compress ``linear.weight``. Already-2:4 weights are kept exactly; otherwise the two
        largest-magnitude weights of each group of 4 are kept (``strict=True`` raises instead)."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold,
                device=w.device, dtype=w.dtype)
        values, meta = tk.compress_24(w, strict=strict)
        m.values.data.copy_(values)
        m.meta.copy_(meta)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def dense_weight(self) -> torch.Tensor:
        return tk.decompress_24(self.values, self.meta, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.values.dtype:
            x2 = x2.to(self.values.dtype)
        t = self.threshold_value
        path = _path(x2)
        if path == "kernel":
            y = tk.sparse24_gemm(x2, self.values, self.meta, t if t > 0 else None)
        elif path == "dense":
            xs = tk.threshold_activations(x2, t) if t > 0 else x2
            y = F.linear(xs, self.dense_weight())
        else:
            y = tk.sparse24_gemm_reference(x2, self.values, self.meta, t if t > 0 else None)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4, threshold={self.threshold_value:.4g}"


class GatherSwiGLUMLP(nn.Module):
    """SwiGLU MLP (``down(silu(gate(x)) * up(x))``, no biases) evaluating only the neurons in
    ``idx`` (int64 buffer). State: ``w_gate``, ``w_up`` [I, H], ``w_down_t`` [I, H] (= down.weight.T),
    ``idx`` [M]. Set a new neuron set at run time with ``set_index`` (e.g. from a predictor)."""

    def __init__(self, hidden_size, intermediate_size, n_keep=None, device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.intermediate_size = int(hidden_size), int(intermediate_size)
        H, I = self.hidden_size, self.intermediate_size
        mk = lambda: nn.Parameter(torch.zeros(I, H, device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.w_gate, self.w_up, self.w_down_t = mk(), mk(), mk()
        n_keep = I if n_keep is None else int(n_keep)
        self.register_buffer("idx", torch.arange(n_keep, dtype=torch.int64, device=device))

    @classmethod
    def from_mlp(cls, mlp: nn.Module, idx=None) -> "GatherSwiGLUMLP":
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name, None)
            if not isinstance(lin, nn.Linear) or lin.bias is not None:
                raise TypeError(f"GatherSwiGLUMLP.from_mlp: mlp.{name} must be a bias-free nn.Linear")
        act = getattr(mlp, "act_fn", None)
        probe = torch.linspace(-4, 4, 9)
        if act is not None and not torch.allclose(act(probe), F.silu(probe)):
            raise TypeError(f"GatherSwiGLUMLP.from_mlp: activation must be SiLU, got {type(act).__name__}")
        wg = mlp.gate_proj.weight.detach()
        m = cls(wg.shape[1], wg.shape[0], device=wg.device, dtype=wg.dtype)
        m.w_gate.data.copy_(wg)
        m.w_up.data.copy_(mlp.up_proj.weight.detach())
        m.w_down_t.data.copy_(mlp.down_proj.weight.detach().t())
        if idx is not None:
            m.set_index(idx)
        return m

    def set_index(self, idx) -> None:
        idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.intermediate_size):
            raise ValueError(f"neuron indices must be in [0, {self.intermediate_size})")
        if idx.unique().numel() != idx.numel():
            raise ValueError("neuron indices must be unique")
        self._buffers["idx"] = idx.to(self.w_gate.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "idx"
        if key in state_dict:  # the kept set may have a different size than at construction
            self._buffers["idx"] = torch.empty_like(state_dict[key], device=self.w_gate.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        if x2.dtype != self.w_gate.dtype:
            x2 = x2.to(self.w_gate.dtype)
        path = _path(x2)
        if path == "kernel":
            y = tk.gather_swiglu(x2, self.w_gate, self.w_up, self.w_down_t, self.idx)
        elif path == "dense":
            wg, wu, wd = self.w_gate[self.idx], self.w_up[self.idx], self.w_down_t[self.idx]
            y = (F.silu(x2 @ wg.t()) * (x2 @ wu.t())) @ wd
        else:
            y = tk.gather_swiglu_reference(x2, self.w_gate, self.w_up, self.w_down_t, self.idx)
        return y.reshape(*shape[:-1], self.hidden_size)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, kept={self.idx.numel()}"
