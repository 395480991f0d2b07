"""The reference for hidden-dimension pruning, written for the tests only (no llmprune code).

The *original* model runs unchanged except that every norm over the hidden channels is recomputed over the
kept channels only: a forward hook replaces its output by ``norm_kept(x[..., kept])`` scattered into zeros,
where ``norm_kept`` is a copy of the norm module holding ``weight[kept]`` (and ``bias[kept]``), so each family's
own formula (Gemma's ``1 + w``, dtype casts) is used. Optionally the output is multiplied by a per-norm factor
(the ``rms`` criterion's closed-form correction).

Why this equals "the channels removed everywhere": in the pre-norm families every reader of the residual
stream (attention, MLP, router, LM head) reads it through a norm. The recomputed norms depend only on the kept
channels and give zeros elsewhere, so the removed channels' values (still present in the original's residual
stream) never reach anything, and a reader's input columns of removed channels multiply zeros. Masking the
stream instead would be wrong: an RMSNorm over ``d'`` channels divides by their RMS, not by the RMS over ``d``.
"""

from __future__ import annotations

import copy

import torch


def hidden_norm_modules(model):
    """(name, module) of every norm over the hidden channels, found by class name and weight shape."""
    d = model.config.hidden_size
    out = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if "Norm" in type(module).__name__ and isinstance(w, torch.Tensor) and tuple(w.shape) == (d,):
            out.append((name, module))
    return out


def reference_hooks(model, kept, scales=None):
    """Hooks making ``model`` compute as if only hidden channels ``kept`` existed; returns the handles."""
    keep = torch.as_tensor(sorted(kept), dtype=torch.long)
    handles = []
    for name, norm in hidden_norm_modules(model):
        small = copy.deepcopy(norm)
        small.weight = torch.nn.Parameter(norm.weight.detach()[keep].clone())
        if isinstance(getattr(norm, "bias", None), torch.Tensor):
            small.bias = torch.nn.Parameter(norm.bias.detach()[keep].clone())
        if hasattr(small, "normalized_shape"):
            small.normalized_shape = (len(keep),)
        factor = 1.0 if scales is None else scales[name]

        def hook(module, args, out, small=small, factor=factor):
            y = small(args[0][..., keep.to(args[0].device)])
            full = torch.zeros_like(out)
            full[..., keep.to(out.device)] = (y * factor).to(out.dtype)
            return full
        handles.append(norm.register_forward_hook(hook))
    return handles
