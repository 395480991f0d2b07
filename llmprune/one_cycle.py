"""Stability-driven one-cycle pruning (the seed: OCSPruner, Ghimire et al., WACV 2026), run inside training.

Instead of train -> prune -> fine-tune, the structure is chosen *while* the model trains:

1. every ``select_every`` steps the units are scored by their group L2 norm (a head's q/k/v rows and o
   columns, a neuron's gate/up rows and down column, GQA groups whole) and the lowest ``heads`` / ``ffn``
   fractions of every layer are marked for removal (uniform per layer, so the result is a standard
   checkpoint; per-group scores are norm / sqrt(fan-in), equal within a unit kind);
2. stability is the Jaccard similarity of the kept sets between selection ``t`` and ``t - 2``, averaged over
   (layer, unit kind) groups, as a running mean of 3;
3. once the stability curve flattens (it rose by less than ``flat`` since the previous selection), a
   group-sparsity penalty on the units about to go grows by ``penalty_step`` per selection and decays their
   weights by ``(1 - reg * lr)`` every step;
4. at stability ``>= threshold`` (or at the step cap) the structure is committed: the units are removed
   physically and training continues on the same learning-rate schedule.

Use it through ``recover(..., callback=OneCycle(...))`` (full fine-tuning, or LoRA: scores and penalty then
act on the effective weights ``W + BA``, and the commit merges the adapters, cuts, and training goes on with
fresh adapters on the smaller model), ``llmprune train``, ``transformers.Trainer(callbacks=[OneCycleCallback(cb)])``, or your own
(accelerate) loop: call :meth:`OneCycle.on_step_end` after every optimizer step and, when it returns a plan,
:func:`rebind_optimizer` (the pruned weights are new, smaller parameters).

Example::

    cb = OneCycle(model, OneCycleConfig(heads=0.25, ffn=0.5), total_steps=300)
    recover(model, RecoveryConfig(steps=300, full=True), data="train.txt", tokenizer=tok, callback=cb)
    cb.stability          # the curve; cb.committed_at: the commit step
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import get_adapter
from .arch.base import weight_matrix
from .config import PrunePlan, PruneConfig

__all__ = ["OneCycleConfig", "OneCycle", "OneCycleCallback", "jaccard", "rebind_optimizer", "optimizer_names"]


@dataclass
class OneCycleConfig:
    heads: float = 0.0
    ffn: float = 0.0
    attention_unit: str = "group"
    select_every: int = 10
    threshold: float = 0.999
    commit_by: float = 0.6  # fraction of the training steps after which the structure is committed anyway
    penalty_step: float = 1e-4
    flat: float = 0.01

    def prune_config(self) -> PruneConfig:
        return PruneConfig(heads=self.heads, ffn=self.ffn, method="magnitude", attention_unit=self.attention_unit,
                           rounding="nearest")


def jaccard(a: list[int] | None, b: list[int] | None) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty or untouched sets)."""
    if a is None or b is None:
        return 1.0
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


@dataclass
class OneCycle:
    model: nn.Module
    config: OneCycleConfig
    total_steps: int
    plans: list[PrunePlan] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    reg: float = 0.0
    committed_at: int | None = None
    #: the peft model wrapping ``model`` when training with LoRA (``recover`` sets it): selection and penalty
    #: then act on the effective weights (adapters merged for the moment), and the commit merges the adapters
    #: for good before cutting (``recover`` wraps the smaller model in fresh adapters)
    peft: Any = None

    @contextmanager
    def _effective_weights(self):
        if self.peft is None:
            yield
            return
        self.peft.merge_adapter()
        try:
            yield
        finally:
            self.peft.unmerge_adapter()

    def _select(self) -> PrunePlan:
        from .score import score_layers
        from .select import plan_pruning

        adapter = get_adapter(self.model)
        cfg = self.config.prune_config()
        return plan_pruning(self.model, adapter, cfg, score_layers(self.model, adapter, cfg, None))

    @torch.no_grad()
    def _penalise(self, lr: float) -> None:
        """Decay the weights of the units the latest selection would remove by ``(1 - reg * lr)``."""
        if self.reg <= 0 or not self.plans:
            return
        adapter = get_adapter(self.model)
        factor = 1 - self.reg * lr
        for layer, lp in zip(adapter.decoder_layers(self.model), self.plans[-1].layers):
            attn, ffn = adapter.attention(layer), adapter.ffn(layer)
            for spec, kept, n in ((attn, lp.kept_heads, attn.num_heads if attn else 0),
                                  (ffn, lp.kept_neurons, ffn.num_neurons if ffn else 0)):
                if spec is None or kept is None:
                    continue
                gone = torch.tensor(sorted(set(range(n)) - set(kept)), dtype=torch.long)
                if gone.numel() == 0:
                    continue
                for slot in (spec.q_slots if spec is attn else spec.slots):
                    w = weight_matrix(slot.module)  # [out, in] view of the parameter (Conv1D transposed)
                    dim = 0 if slot.dim == "out" else 1
                    idx = slot.indices(gone).to(w.device)
                    w.index_copy_(dim, idx, w.index_select(dim, idx) * factor)

    def on_step_end(self, step: int, lr: float) -> PrunePlan | None:
        """Call after every optimizer step; returns the committed plan (units now removed) once, else ``None``."""
        if self.committed_at is not None:
            return None
        with self._effective_weights():  # decaying merged weights, then unmerging, decays W + BA exactly
            self._penalise(lr)
        if step % self.config.select_every and step < self.total_steps:
            return None
        with self._effective_weights():
            self.plans.append(self._select())
        if len(self.plans) >= 3:
            old, new = self.plans[-3], self.plans[-1]
            sims = [jaccard(a.kept_heads, b.kept_heads) for a, b in zip(old.layers, new.layers)]
            sims += [jaccard(a.kept_neurons, b.kept_neurons) for a, b in zip(old.layers, new.layers)]
            self.raw.append(sum(sims) / len(sims))
            self.stability.append(sum(self.raw[-3:]) / len(self.raw[-3:]))
            if len(self.stability) >= 2 and self.stability[-1] - self.stability[-2] < self.config.flat:
                self.reg += self.config.penalty_step
        cap = math.ceil(self.config.commit_by * self.total_steps)
        if (self.stability and self.stability[-1] >= self.config.threshold) or step >= cap:
            from .surgery import apply_plan

            plan = self.plans[-1]
            if self.peft is not None:
                self.peft.merge_and_unload()  # adapters into the weights, LoRA modules back to plain ones
                self.peft = None
            apply_plan(self.model, plan)
            self.committed_at = step
            return plan
        return None

    def plot(self, path: str) -> None:
        """The stability curve (and the commit step) as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        every = self.config.select_every
        xs = [every * (i + 3) for i in range(len(self.stability))]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, self.stability, "o-", label="stability (Jaccard t vs t-2, mean of 3)")
        ax.axhline(self.config.threshold, color="gray", ls=":", label=f"threshold {self.config.threshold}")
        if self.committed_at is not None:
            ax.axvline(self.committed_at, color="red", ls="--", label=f"commit at step {self.committed_at}")
        ax.set_xlabel("training step")
        ax.set_ylabel("stability")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=130)


def optimizer_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The model parameter names in each of the optimizer's groups (call before the commit)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"] if id(p) in name_of] for g in optimizer.param_groups]


def rebind_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, names: list[list[str]]) -> None:
    """After a commit, point each optimizer group (``names`` from :func:`optimizer_names`) at the model's
    current parameters; moments of replaced (pruned) parameters are dropped, the others and the groups'
    learning rates (the schedule) are kept."""
    current = dict(model.named_parameters())
    for group, group_names in zip(optimizer.param_groups, names):
        group["params"] = [current[n] for n in group_names if n in current]
    live = {id(p) for p in current.values()}
    state = optimizer.state
    for p in list(state.keys()):
        if id(p) not in live:
            del state[p]


def _trainer_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class OneCycleCallback(_trainer_callback_base()):
    """:class:`OneCycle` as a ``transformers.Trainer`` callback (full fine-tuning)::

        cb = OneCycle(model, OneCycleConfig(heads=0.25, ffn=0.5), total_steps=args.max_steps)
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[OneCycleCallback(cb)]).train()
    """

    def __init__(self, one_cycle: OneCycle):
        self.one_cycle = one_cycle

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        model = self.one_cycle.model
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
        names = optimizer_names(optimizer, model) if optimizer is not None else None
        if self.one_cycle.on_step_end(state.global_step, lr) is not None and optimizer is not None:
            rebind_optimizer(optimizer, model, names)
        return control
