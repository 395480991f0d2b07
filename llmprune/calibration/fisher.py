"""The empirical Fisher of the loss with respect to each projection's output (pure statistics gathering).

For the output ``y = W x`` of a projection that writes into the residual stream (o_proj, down_proj: the
adapter's ``output`` slots), the Kronecker-factored second-order estimate of how much a weight change
``ΔW`` raises the summed token loss is ``ΔL ≈ ½ tr(F ΔW G ΔWᵀ)``, with ``G = Σ_t x_t x_tᵀ`` the input Gram
matrix and ``F = mean_t g_t g_tᵀ``, ``g_t = ∂L/∂y_t`` (K-FAC, Martens & Grosse 2015; used for pruning by the
LLM Surgeon, van der Ouderaa et al. 2024). ``F`` is what makes a removal in layer 2 and one in layer 28
comparable: a plain output error ignores that the residual stream, and the loss's sensitivity to it,
differ by orders of magnitude between layers.

One forward and backward pass of the whole model over ``batches`` (no weight gradients are kept: only
the output gradients are read, by hooks). ``diagonal=True`` keeps ``diag(F)`` only: ``hidden`` floats per
projection instead of ``hidden²``, for models whose full factors would not fit.

Example::

    fisher = output_fisher(model, adapter, batches[:2])       # [{o_proj: F, down_proj: F}, ...] per layer
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchAdapter
from ..arch.base import weight_matrix
from ..core.distributed import all_reduce_sum, world

__all__ = ["output_fisher", "output_modules_of"]


def output_modules_of(adapter: ArchAdapter, layer: nn.Module) -> list[nn.Module]:
    out = []
    for spec in (adapter.attention(layer), adapter.ffn(layer)):
        if spec is not None and isinstance(spec.output.module, nn.Module) and spec.output.module not in out:
            out.append(spec.output.module)
    return out


def output_fisher(model: nn.Module, adapter: ArchAdapter, batches: list[torch.Tensor], diagonal: bool = False,
                  device: Any = None, labels: str = "data",
                  seed: int = 0) -> list[dict[nn.Module, torch.Tensor]] | None:
    """Per decoder layer, ``{output module: F}`` (float64 on CPU, ``[out, out]``, or ``[out]`` when
    ``diagonal``), from the next-token loss on ``batches``. ``None`` for models without a language-model head
    (encoders): callers then weigh output errors plainly.

    ``labels="data"``: the loss of the text's own next tokens (the *empirical* Fisher). ``labels="model"``: of
    next tokens sampled from the model's own prediction at each position (one per position, seeded by
    ``seed``): a Monte-Carlo estimate of the *true* Fisher, the curvature of the KL divergence from the
    unpruned model, which does not lean on how surprising the calibration text is to the model."""
    if labels not in ("data", "model"):
        raise ValueError(f"labels={labels!r}; choose data or model")
    gen = torch.Generator().manual_seed(int(seed))
    layers = adapter.decoder_layers(model)
    mods = [output_modules_of(adapter, layer) for layer in layers]
    acc: dict[nn.Module, torch.Tensor] = {}
    handles = []
    for per_layer in mods:
        for m in per_layer:
            n_out = weight_matrix(m).shape[0]
            acc[m] = torch.zeros(n_out if diagonal else (n_out, n_out), dtype=torch.float64)

            def accumulate(grad: torch.Tensor, m: nn.Module = m) -> None:
                g = grad.detach().reshape(-1, grad.shape[-1]).double()
                acc[m] += (g.pow(2).sum(0) if diagonal else g.t() @ g).cpu()

            def hook(module: nn.Module, args: Any, out: Any, accumulate=accumulate) -> None:
                # a hook on the output tensor, not a module backward hook: those wrap the output in a view
                # that in-place residual additions (Falcon's parallel attention) may not modify
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(accumulate)

            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    requires = {p: p.requires_grad for p in model.parameters()}
    tokens = 0
    try:
        for p in model.parameters():  # only activation gradients are needed; no weight gradient is stored
            p.requires_grad_(False)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        # one window at a time: the logits, their softmax and its gradient are [tokens, vocab] each, and a
        # whole batch of them (8 x 512 x 49k floats at 135M) dominated the peak memory of the pass
        for batch in (window for b in batches for window in b.split(1)):
            batch = batch.to(dev)
            with torch.enable_grad():
                emb = model.get_input_embeddings()(batch).detach().requires_grad_(True)
                out = model(inputs_embeds=emb, use_cache=False)
                logits = getattr(out, "logits", None)
                if logits is None or logits.shape[-1] != model.get_input_embeddings().num_embeddings:
                    return None
                flat = logits[:, :-1].flatten(0, 1).float()
                if labels == "model":
                    target = _sample_next_tokens(flat.detach(), gen)
                else:
                    target = batch[:, 1:].flatten()
                loss = F.cross_entropy(flat, target, reduction="sum")
                loss.backward()
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    acc, tokens = _reduce_over_processes(acc, tokens, dev)
    return [{m: acc[m] / max(tokens, 1) for m in per_layer} for per_layer in mods]


def _sample_next_tokens(logits: torch.Tensor, gen: torch.Generator, rows: int = 256) -> torch.Tensor:
    """One token per row of ``logits`` drawn from its softmax with the CPU generator ``gen`` (the same draw on
    every device), a few rows at a time: a whole window's probabilities would be another ``[tokens, vocab]``."""
    out = [torch.multinomial(torch.softmax(chunk.float(), dim=-1).cpu(), 1, generator=gen).reshape(-1)
           for chunk in logits.split(rows)]
    return torch.cat(out).to(logits.device)


def _reduce_over_processes(acc: dict[nn.Module, torch.Tensor], tokens: int,
                           dev: torch.device) -> tuple[dict[nn.Module, torch.Tensor], int]:
    """Under ``accelerate launch`` each process saw its own windows: sum the outer products and the token counts
    over processes, so every process prices removals with the same Fisher (and so makes the same cuts)."""
    if world()[1] == 1:
        return acc, tokens
    on = dev if dev.type == "cuda" else torch.device("cpu")  # NCCL reduces device tensors only
    keys = list(acc)
    out = all_reduce_sum(*[acc[k].to(on) for k in keys], torch.tensor([float(tokens)], dtype=torch.float64, device=on))
    return {k: t.cpu() for k, t in zip(keys, out[:-1])}, int(out[-1].item())
