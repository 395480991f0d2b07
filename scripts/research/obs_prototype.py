"""Research prototype (see run_obs_prototype.py): Fisher-weighted structured OBS with a global allocation and a
sequential refit, on the library's greedy solver (llmprune.structured.obs)."""
import math, time, json, sys, os
import torch
from torch import nn
import torch.nn.functional as Fn

from llmprune.arch import get_adapter
from llmprune.arch.base import weight_matrix, set_weight_matrix
from llmprune.calibration.calibrate import capture_layer_inputs, run_layer, as_batches
from llmprune.core.config import LayerPlan, PrunePlan
from llmprune.arch.surgery import prune_layer
from llmprune.structured.reconstruct import refit_columns
from llmprune.core.allocate import CostCurve, allocate_by_cost
from llmprune.checkpoint.perlayer import set_config_widths

D = torch.float64


from llmprune.structured.obs import greedy_block_removal, greedy_column_removal


def greedy_columns(W, G, n_remove, F=None, percdamp=0.01):
    order, cost = greedy_column_removal(W, G, n_remove, F, percdamp)
    return order, cost.tolist()


def head_selection(W_o, G_o, attn, n_steps, mode, F=None, percdamp=0.01):
    """(removed query heads, removed KV heads, cumulative costs) of ``n_steps`` greedy steps."""
    H, KV = attn.num_heads, attn.num_kv_heads
    gs = H // KV
    hd = W_o.shape[1] // H
    heads = [torch.arange(h * hd, (h + 1) * hd) for h in range(H)]
    if mode == "group" or gs == 1:
        blocks = [torch.cat(heads[g * gs:(g + 1) * gs]) for g in range(KV)]
        steps, cost = greedy_block_removal(W_o, G_o, blocks, n_steps, None, F, percdamp)
        rem_kv = [g for s in steps for g in s]
        return [h for g in rem_kv for h in range(g * gs, (g + 1) * gs)], rem_kv, cost.tolist()
    groups = [list(range(g * gs, (g + 1) * gs)) for g in range(KV)]
    steps, cost = greedy_block_removal(W_o, G_o, heads, n_steps, groups, F, percdamp)
    return [h for s in steps for h in s], [], cost.tolist()


# ---------------------------------------------------------------------------------------------------
def dense_stats(model, adapter, batches, fisher=True, n_fisher=None):
    """Per layer: Gram of o_proj / down_proj inputs, and Fisher of their outputs (grad outer products)."""
    layers = adapter.decoder_layers(model)
    mods = []
    for layer in layers:
        mods.append((adapter.attention(layer).output.module, adapter.ffn(layer).output.module))
    G = {}; F = {}; hs = []
    ntok = 0
    for i, (o, d) in enumerate(mods):
        for m in (o, d):
            n_in = weight_matrix(m).shape[1]; n_out = weight_matrix(m).shape[0]
            G[m] = torch.zeros(n_in, n_in, dtype=D)
            F[m] = torch.zeros(n_out, n_out, dtype=D)
            def pre(mod, a, m=m):
                x = a[0].detach().reshape(-1, a[0].shape[-1]).to(D)
                G[m].addmm_(x.t(), x)
            hs.append(m.register_forward_pre_hook(pre))
            if fisher:
                def bwd(mod, gin, gout, m=m):
                    g = gout[0].detach().reshape(-1, gout[0].shape[-1]).to(D)
                    F[m].addmm_(g.t(), g)
                hs.append(m.register_full_backward_hook(bwd))
    model.eval()
    nf_tok = 0
    try:
        for bi, b in enumerate(batches):
            if fisher and (n_fisher is None or bi * b.shape[0] < n_fisher):
                nf_tok += b.numel()
                with torch.enable_grad():
                    out = model(b, labels=b, use_cache=False)
                    # sum loss over tokens
                    (out.loss * (b.numel() - b.shape[0])).backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(b, use_cache=False)
            ntok += b.numel()
    finally:
        for h in hs:
            h.remove()
    for m in F:
        F[m] /= max(nf_tok, 1)
    return mods, G, F


def param_per_head(attn):
    # q rows + o cols per query head
    return sum(s.width * weight_matrix(s.module).shape[1] if s.dim == "out" else s.width * weight_matrix(s.module).shape[0]
               for s in attn.q_slots)


def param_per_kv(attn):
    return sum(s.width * weight_matrix(s.module).shape[1] if s.dim == "out" else s.width * weight_matrix(s.module).shape[0]
               for s in attn.kv_slots)


def param_per_neuron(ffn):
    return sum(s.width * weight_matrix(s.module).shape[1] if s.dim == "out" else s.width * weight_matrix(s.module).shape[0]
               for s in ffn.slots)


def allocate(model, adapter, mods, G, F, heads, ffn, mode, use_fisher, joint, max_frac=0.6, percdamp=0.01,
             neuron_step=8, protect=()):
    layers = adapter.decoder_layers(model)
    hcurves, ncurves = [], []
    for i, layer in enumerate(layers):
        attn, f = adapter.attention(layer), adapter.ffn(layer)
        o, d = mods[i]
        H, KV = attn.num_heads, attn.num_kv_heads
        gs = H // KV
        if heads > 0:
            if mode == "group":
                steps = KV - 1; unit_params = gs * param_per_head(attn) + param_per_kv(attn)
            else:
                steps = gs - 1; unit_params = KV * param_per_head(attn)
            if i in protect:
                steps = 0
            _, _, hc = head_selection(weight_matrix(o), G[o], attn, steps, mode, F[o] if use_fisher else None, percdamp)
            hcurves.append(CostCurve(unit_params, hc))
        if ffn > 0:
            nmax = int(max_frac * f.num_neurons) if i not in protect else 0
            _, nc = greedy_columns(weight_matrix(d), G[d], nmax, F[d] if use_fisher else None, percdamp)
            nc = nc[::neuron_step]
            ncurves.append(CostCurve(neuron_step * param_per_neuron(f), nc))
    a0 = adapter.attention(layers[0]); f0 = adapter.ffn(layers[0])
    L = len(layers)
    H, KV = a0.num_heads, a0.num_kv_heads
    head_budget = round(heads * H * L) * param_per_head(a0) + (round(heads * KV * L) * param_per_kv(a0) if mode == "group" else 0)
    neuron_budget = round(ffn * f0.num_neurons * L) * param_per_neuron(f0)
    if joint:
        budget = head_budget + neuron_budget
        if isinstance(joint, float):  # a fraction of all decoder-block parameters
            budget = int(joint * sum(p.numel() for layer in layers for p in layer.parameters()))
        ks = allocate_by_cost(hcurves + ncurves, budget)
        hk, nk = ks[:len(hcurves)], ks[len(hcurves):]
    else:
        hk = allocate_by_cost(hcurves, head_budget) if hcurves else []
        nk = allocate_by_cost(ncurves, neuron_budget) if ncurves else []
    hk = hk or [0] * L
    nk = [k * neuron_step for k in nk] or [0] * L
    return hk, nk, hcurves, ncurves


@torch.no_grad()
def sequential_prune(model, adapter, batches, hk, nk, mode, Fs=None, percdamp=0.01, select_fisher=True,
                     dense_target=False):
    layers = adapter.decoder_layers(model)
    captured = capture_layer_inputs(model, adapter, batches)
    hidden = captured.hidden
    dev = torch.device("cpu")
    plan = PrunePlan(layers=[LayerPlan() for _ in layers])
    for i, layer in enumerate(layers):
        attn, f = adapter.attention(layer), adapter.ffn(layer)
        o, d = attn.output.module, f.output.module
        lp = LayerPlan()
        H, KV = attn.num_heads, attn.num_kv_heads
        gs = H // KV
        def gram(m):
            Gm = torch.zeros(weight_matrix(m).shape[1], weight_matrix(m).shape[1], dtype=D)
            def pre(mod, a):
                x = a[0].reshape(-1, a[0].shape[-1]).to(D)
                Gm.addmm_(x.t(), x)
            h = m.register_forward_pre_hook(pre)
            for b, hb in enumerate(hidden):
                run_layer(layer, hb, *captured.layer_args[i][b], dev)
            h.remove()
            return Gm
        Fo = Fs.get(("o", i)) if (Fs and select_fisher) else None
        Fd = Fs.get(("d", i)) if (Fs and select_fisher) else None
        if hk[i] > 0:
            Go = gram(o)
            W0 = weight_matrix(o).detach().clone()
            rem_q, rem_kv, _ = head_selection(W0, Go, attn, hk[i], mode, Fo, percdamp)
            kept_q = [h for h in range(H) if h not in set(rem_q)]
            kept_kv = [g for g in range(KV) if g not in set(rem_kv)]
            hd = W0.shape[1] // H
            cols = torch.tensor([h * hd + c for h in kept_q for c in range(hd)])
            prune_layer(adapter, layer, LayerPlan(kept_heads=kept_q, kept_kv_heads=kept_kv))
            set_weight_matrix(o, refit_columns(W0, Go, cols, percdamp))
            lp.kept_heads, lp.kept_kv_heads = kept_q, kept_kv
        if nk[i] > 0:
            Gd = gram(d)
            W0 = weight_matrix(d).detach().clone()
            order, _ = greedy_columns(W0, Gd, nk[i], Fd, percdamp)
            kept = [j for j in range(W0.shape[1]) if j not in set(order)]
            prune_layer(adapter, layer, LayerPlan(kept_neurons=kept))
            set_weight_matrix(d, refit_columns(W0, Gd, torch.tensor(kept), percdamp))
            lp.kept_neurons = kept
        plan.layers[i] = lp
        hidden = [run_layer(layer, hb, *captured.layer_args[i][b], dev) for b, hb in enumerate(hidden)]
    set_config_widths(model, adapter)
    return plan
