"""The reference for the core invariant: the original model with pruned units masked to zero.

Implemented with forward hooks only (no weight is edited), independently of llmprune's surgery:
a removed head's output columns and a removed neuron's activation are multiplied by zero where they
enter o_proj / down_proj, and a removed layer passes its input through unchanged.

Mixture of experts (``LayerPlan.kept_experts`` / ``kept_expert_neurons``):

- A removed expert must behave as if it never existed, which is *not* zeroing its output: the router's
  softmax and top-k would still count it. The reference masks the removed experts' router logits to
  ``-inf`` and recomputes the router's documented outputs from the masked logits (softmax over experts,
  top-k, renormalisation of the k weights when the router does it). A removed expert then gets
  probability 0 and is never among the top-k (unless fewer than k experts remain; then it is picked with
  weight 0 and contributes nothing, which is what lowering top_k does in the pruned model).
- Batched experts have no hook point between an expert's activation and its down projection, so a
  removed neuron of expert ``e`` is masked by temporarily zeroing column ``n`` of ``down_proj[e]`` during
  the forward (pre-hook swaps in a masked copy, post-hook restores the original). This equals zeroing
  the neuron's activation because its contribution is linear through ``down_proj``.
"""

from __future__ import annotations

import torch

from llmprune.arch import get_adapter
from llmprune.core.config import PrunePlan


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
        moe = adapter.experts(layer) if hasattr(adapter, "experts") else None
        if moe is not None and lp.kept_experts is not None:
            handles.append(_mask_experts(moe, _complement(lp.kept_experts, moe.num_experts)))
        if moe is not None and lp.kept_expert_neurons is not None:
            handles += _mask_expert_neurons(moe, lp.kept_expert_neurons)
    return handles


def _mask_experts(moe, removed):
    router = moe.router.module
    norm = getattr(router, "norm_topk_prob", True)  # Mixtral always renormalises the top-k weights

    def hook(module, args, out):
        logits = out[0].clone()
        logits[:, removed] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, module.top_k, dim=-1)
        if norm:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), idx
    return router.register_forward_hook(hook)


def _mask_expert_neurons(moe, kept_per_expert):
    down = [p for p in moe.params if p.dim == "in"][-1]
    owner, name = down.module, down.name
    w = getattr(owner, name)
    masked = w.detach().clone()
    for e, kept in enumerate(kept_per_expert):
        masked[e][:, _complement(kept, moe.num_neurons)] = 0
    saved = {}

    def pre(module, args):
        saved["w"] = getattr(module, name)
        setattr(module, name, torch.nn.Parameter(masked, requires_grad=False))

    def post(module, args, out):
        setattr(module, name, saved.pop("w"))
    return [owner.register_forward_pre_hook(pre), owner.register_forward_hook(post)]
