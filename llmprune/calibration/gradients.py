"""First-order Taylor statistics (LLM-Pruner's ``|w · ∂L/∂w|``) with memory bounded by one parameter's gradient.

For every module the criteria read, the element-wise importance ``|W ⊙ G|`` of each calibration batch is
reduced *inside the gradient hook* to its row sums ``[out]`` and column sums ``[in]`` (a structured unit owns
whole rows or whole columns, so these sums are all a unit score needs), and the gradient is freed at once.
So beyond the model and one backward pass's activations, the extra memory is one parameter's gradient at a
time plus two vectors per module — not a second copy of the model, as a plain ``loss.backward()`` keeping
every ``.grad`` would need (LLM-Pruner needs about 80 GB for a 7B model that way).

Batches are scored independently and their importances summed (``Σ_b |W ⊙ G_b|``); with a single batch this is
exactly LLM-Pruner's first-order element-wise score.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import _is_conv1d
from .calibrate import InputStats, LayerStats, _slot_modules
from ..core.memory import release_freed_memory

__all__ = ["taylor_statistics"]





def taylor_statistics(model: nn.Module, adapter: ArchAdapter, batches: Iterable[torch.Tensor],
                      stats: list[LayerStats] | None = None, progress: bool = False) -> list[LayerStats]:
    """Add ``grad_rows`` / ``grad_cols`` (row / column sums of ``Σ_b |W ⊙ G_b|``, ``[out, in]`` layout) to the
    :class:`InputStats` of every scored module; creates ``stats`` when ``None``. Works on the model's device."""
    from ..core.progress import progress_bar

    layers = adapter.decoder_layers(model)
    stats = stats if stats is not None else [LayerStats() for _ in layers]
    modules: dict[nn.Module, InputStats] = {}
    for layer, layer_stats in zip(layers, stats):
        for module in _slot_modules(adapter, layer):
            modules[module] = layer_stats.inputs.setdefault(module, InputStats())
    if any(not hasattr(m, "weight") or m.weight.dim() != 2 for m in modules):
        raise ValueError("the taylor criterion scores 2-D Linear weights; this model's experts are batched "
                         "3-D tensors (use wanda or flap for mixture-of-experts layers)")
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for module, s in modules.items():
            w = module.weight
            w.requires_grad_(True)
            transposed = _is_conv1d(module)

            def fold(param: torch.Tensor, s: InputStats = s, transposed: bool = transposed) -> None:
                imp = (param.detach().float() * param.grad.float()).abs()
                if transposed:  # Conv1D stores [in, out]
                    imp = imp.t()
                rows, cols = imp.sum(1).double().cpu(), imp.sum(0).double().cpu()
                s.grad_rows = rows if s.grad_rows is None else s.grad_rows + rows
                s.grad_cols = cols if s.grad_cols is None else s.grad_cols + cols
                param.grad = None  # free it now: memory stays at one gradient
                if param.device.type == "cpu":
                    release_freed_memory()

            handles.append(w.register_post_accumulate_grad_hook(fold))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for ids in progress_bar(list(batches), desc="taylor gradients", disable=not progress):
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return stats
