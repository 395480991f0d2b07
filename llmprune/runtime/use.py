"""``use_kernels``: swap a model's target layers for kernel-backed modules, in place, and bind its
``save_pretrained`` to the compressed format."""

from __future__ import annotations

import torch
from torch import nn

from .convert import KernelConfig, _set, calibrate_thresholds, find_targets
from .io import bind_save_pretrained
from .modules import ActSparseLinear, GatherSwiGLUMLP, Sparse24Linear

__all__ = ["use_kernels"]


@torch.no_grad()
def use_kernels(model: nn.Module, config: KernelConfig | dict | None = None, calib_batches=None) -> nn.Module:
    """Replace target layers of ``model`` in place with kernel-backed modules; returns ``model``.
    The config is recorded as ``model.llmprune_kernel_config`` (used by ``save_compressed``), and
    ``model.save_pretrained`` is bound to ``save_compressed`` so it stores the compressed format."""
    if config is None:
        config = KernelConfig()
    elif isinstance(config, dict):
        config = KernelConfig.from_dict(config)

    mods = dict(model.named_modules())
    replaced_mlps = []
    for mlp_name, idx in (config.ffn_neurons or {}).items():
        if mlp_name not in mods:
            raise KeyError(f"use_kernels: ffn_neurons names unknown module {mlp_name!r}")
        _set(model, mlp_name, GatherSwiGLUMLP.from_mlp(mods[mlp_name], idx))
        replaced_mlps.append(mlp_name + ".")

    targets = [n for n in find_targets(model, config) if not any(n.startswith(p) for p in replaced_mlps)]
    if not targets and not replaced_mlps:
        raise ValueError(f"use_kernels: no nn.Linear matches targets={config.targets}")

    thresholds = {n: config.threshold_for(n) for n in targets}
    need = [n for n in targets if thresholds[n] is None and config.sparsity_for(n) > 0]
    if need:
        if calib_batches is None:
            raise ValueError(
                f"use_kernels: {len(need)} layers (e.g. {need[0]}) have an activation_sparsity target but no "
                "threshold; pass config.thresholds or calib_batches"
            )
        calib = calibrate_thresholds(model, calib_batches, config.activation_sparsity, targets=need)
        thresholds.update({n: calib[n] for n in need})

    mods = dict(model.named_modules())
    for n in targets:
        lin = mods[n]
        t = float(thresholds[n] or 0.0)
        new = Sparse24Linear.from_linear(lin, threshold=t) if config.weight_24 else ActSparseLinear.from_linear(lin, t)
        _set(model, n, new)
    model.llmprune_kernel_config = config
    bind_save_pretrained(model)
    return model
