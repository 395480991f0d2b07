"""The reference for the core invariant: the original model with pruned units masked to zero.

Implemented with forward hooks only (no weight is edited), independently of llmprune's surgery:
a removed head's output columns and a removed neuron's activation are multiplied by zero where they
enter o_proj / down_proj, and a removed layer passes its input through unchanged.
"""

from __future__ import annotations

import torch

from llmprune.arch import get_adapter
from llmprune.config import PrunePlan


def _complement(kept, n):
    return [i for i in range(n) if i not in set(kept)]


def mask_model(model, plan: PrunePlan):
    """Register masking hooks on ``model`` (unpruned) for ``plan``; returns the hook handles."""
    adapter = get_adapter(model)
    handles = []
    for i, (layer, lp) in enumerate(zip(adapter.decoder_layers(model), plan.layers)):
        if i in plan.removed_layers:
            def skip(module, args, kwargs, out):
                h = args[0] if args else kwargs["hidden_states"]
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            handles.append(layer.register_forward_hook(skip, with_kwargs=True))
            continue
        masks = []
        attn = adapter.attention(layer)
        if lp.kept_heads is not None and attn is not None:
            masks.append((attn.output, _complement(lp.kept_heads, attn.num_heads)))
        ffn = adapter.ffn(layer)
        if lp.kept_neurons is not None and ffn is not None:
            masks.append((ffn.output, _complement(lp.kept_neurons, ffn.num_neurons)))
        for slot, removed in masks:
            if not removed:
                continue
            idx = slot.indices(removed)

            def zero(module, args, idx=idx):
                x = args[0].clone()
                x[..., idx.to(x.device)] = 0
                return (x,) + tuple(args[1:])
            handles.append(slot.module.register_forward_pre_hook(zero))
    return handles
