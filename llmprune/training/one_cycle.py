"""Stability-driven one-cycle pruning (the seed: OCSPruner, Ghimire et al., WACV 2026), run inside training.

Instead of train -> prune -> fine-tune, the structure is chosen *while* the model trains:

1. every ``select_every`` steps every unit is scored (a head's q/k/v rows and o columns, a neuron's gate/up
   rows and down column, GQA groups whole) with the ``method`` criterion and a selection is made:
   ``allocation="global"`` (METHODS.md) ranks the per-layer-normalised scores of all layers against one
   threshold, with at most ``cap_limit * (1 - exp(-cap_rate * C))`` of a layer removed (``C``: the layer's
   channels, ``heads * head_dim`` for attention and the neuron count for the FFN); ``"uniform"`` removes the
   same fraction from every layer (a standard checkpoint);
2. stability is the Jaccard similarity of the kept sets between selection ``t`` and ``t - 2``, averaged over
   (layer, unit kind) groups, as a running mean of 3;
3. once the stability curve flattens (it rose by less than ``flat`` since the previous selection), a
   group-sparsity penalty on the units about to go grows by ``penalty_step`` per selection and decays their
   weights by ``(1 - reg * lr / peak_lr)`` after every step;
4. at stability ``>= threshold`` (or at the step cap ``commit_by``) the structure is committed: the units are
   removed physically (with ``refit``, the output projections are refitted by least squares on recent
   training batches, layer by layer, as ``PruneConfig(reconstruct=True)`` does) and training continues on the
   same learning-rate schedule.

Adaptations to LLMs (the paper trains CNNs with SGD; documented in BENCHMARKS.md with measurements):

- ``method``: the paper's score is the group L2 norm / sqrt(fan-in) (``"magnitude"``: within one unit kind
  the fan-in is the same for every unit, so this is the L2 norm). Weight norms are a weak signal in LLMs
  (outlier features; Wanda), so the default is ``"wanda"``: |W| times the input norms, measured on the last
  ``select_batches`` training batches (recorded by a hook on the input embedding while the model trains;
  one forward pass per selection). ``"flap"`` works too.
- The paper multiplies scores by ``(1 - the group's FLOPs share)``; with separate ``heads`` and ``ffn``
  targets every unit a selection compares has the same cost, so the factor cannot change a selection and
  is left out.
- The penalty decays by ``reg * lr`` in the paper, with SGD learning rates near 0.1; with AdamW's 1e-4-scale
  rates that decay vanishes, so the rate enters relative to its peak (the schedule's shape), and
  ``penalty_step`` (5e-3 per selection) shrinks the units about to go by about e^-3 over ten selections, as
  the paper's 1e-4 per epoch does over ten ImageNet epochs.
- ``refit`` at the commit (not in the paper): the training that follows is short for an LLM, so the cut
  starts from the least-squares optimum of the kept columns instead of from the plain cut.

Use it through ``recover(..., callback=OneCycle(...))`` (full fine-tuning, or LoRA: scores and penalty then
act on the effective weights ``W + BA``, and the commit merges the adapters, cuts, and training goes on with
fresh adapters on the smaller model), ``llmprune train``, ``transformers.Trainer(callbacks=[OneCycleCallback(cb)])``,
or your own (accelerate) loop: call :meth:`OneCycle.on_step_end` after every optimizer step and, when it
returns a plan, :func:`rebind_optimizer` (the pruned weights are new, smaller parameters).

Example::

    cb = OneCycle(model, OneCycleConfig(heads=0.25, ffn=0.5), total_steps=300)
    recover(model, RecoveryConfig(steps=300, full=True), data="train.txt", tokenizer=tok, callback=cb)
    cb.stability          # the curve; cb.committed_at: the commit step
"""

from __future__ import annotations

import math
from collections import deque
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter, get_adapter
from ..arch.base import weight_matrix
from ..core.config import PrunePlan, PruneConfig, _JsonMixin
from ..structured.score import LayerScores

__all__ = ["OneCycleConfig", "OneCycle", "OneCycleCallback", "jaccard", "layer_cap", "rebind_optimizer",
           "optimizer_names"]

#: criteria a selection can use during training (taylor / single-unit need passes of their own)
SELECTION_METHODS = ("wanda", "flap", "magnitude", "magnitude_l1")


@dataclass
class OneCycleConfig(_JsonMixin):
    heads: float = 0.0
    ffn: float = 0.0
    attention_unit: str = "auto"  # resolved by OneCycle like PruneConfig's (llmprune.structured.select.resolve_config)
    method: str = "wanda"
    allocation: str = "global"
    cap_limit: float = 0.75
    cap_rate: float = 0.015
    select_every: int = 10
    select_batches: int = 2
    threshold: float = 0.999
    commit_by: float = 0.6  # fraction of the training steps after which the structure is committed anyway
    penalty_step: float = 5e-3
    flat: float = 0.01
    refit: bool = True
    refit_batches: int = 8
    percdamp: float = 0.01

    def validate(self) -> None:
        for name in ("heads", "ffn"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"one-cycle {name} must be in [0, 1), got {getattr(self, name)}")
        if self.heads == 0 and self.ffn == 0:
            raise ValueError("one-cycle needs heads > 0 or ffn > 0")
        if self.method not in SELECTION_METHODS:
            raise ValueError(f"one-cycle method must be one of {', '.join(SELECTION_METHODS)}, got {self.method!r}")
        if self.allocation not in ("global", "uniform"):
            raise ValueError(f"one-cycle allocation must be 'global' or 'uniform', got {self.allocation!r}")
        if self.select_every < 1 or self.select_batches < 1 or self.refit_batches < 1:
            raise ValueError("select_every, select_batches and refit_batches must be >= 1")
        if not 0 < self.commit_by <= 1 or not 0 < self.threshold <= 1:
            raise ValueError("commit_by and threshold must be in (0, 1]")

    def prune_config(self) -> PruneConfig:
        return PruneConfig(heads=self.heads, ffn=self.ffn, method=self.method, attention_unit=self.attention_unit,
                           allocation=self.allocation, rounding="nearest", reconstruct=self.refit,
                           percdamp=self.percdamp)


def jaccard(a: list[int] | None, b: list[int] | None) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty or untouched sets)."""
    if a is None or b is None:
        return 1.0
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def layer_cap(channels: int, limit: float = 0.75, rate: float = 0.015) -> float:
    """Largest fraction of a layer's units a selection may remove (OCSPruner): ``limit * (1 - exp(-rate * C))``."""
    return limit * (1.0 - math.exp(-rate * channels))


def pinned_scores(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> list[LayerScores]:
    """Scores that make any count-preserving selection pick exactly ``plan``'s units (1 kept, 0 removed)."""
    out = []
    for layer, lp in zip(adapter.decoder_layers(model), plan.layers):
        attn, ffn, s = adapter.attention(layer), adapter.ffn(layer), LayerScores()
        if attn is not None and lp.kept_heads is not None:
            s.q_heads, s.kv_heads = torch.zeros(attn.num_heads), torch.zeros(attn.num_kv_heads)
            s.q_heads[lp.kept_heads] = 1.0
            s.kv_heads[lp.kept_kv_heads or []] = 1.0
            s.group_size = attn.group_size
        if ffn is not None and lp.kept_neurons is not None:
            s.neurons = torch.zeros(ffn.num_neurons)
            s.neurons[lp.kept_neurons] = 1.0
        out.append(s)
    return out


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
    #: step at which the penalty started (the stability curve flattened)
    penalty_from: int | None = None

    def __post_init__(self) -> None:
        self.config.validate()
        if self.config.attention_unit == "auto":
            from ..structured.select import resolve_config

            unit = resolve_config(self.model, get_adapter(self.model), self.config.prune_config()).attention_unit
            self.config = dataclasses.replace(self.config, attention_unit=unit)
        keep = max(self.config.select_batches, self.config.refit_batches if self.config.refit else 0)
        self._recent: deque[torch.Tensor] = deque(maxlen=keep)
        self._peak_lr = 0.0
        self._busy = False
        # the embedding sees every training batch's token ids, also under peft (whose wrappers call the
        # model's forward directly, past any hook on the model itself)
        self._hook = self.model.get_input_embeddings().register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        if module.training and not self._busy and args and isinstance(args[0], torch.Tensor):
            self._recent.append(args[0].detach().clone())  # on its device: no host sync per training step

    def _batches(self, n: int) -> list[torch.Tensor]:
        if not self._recent:
            raise RuntimeError("one-cycle: no training batches were seen (the selection calibrates on the token ids "
                               "of recent training batches; inputs_embeds-only training is not supported) — or use "
                               "method='magnitude' and refit=False")
        device = self.model.get_input_embeddings().weight.device
        return [b.to(device) for b in list(self._recent)[-n:]]

    @contextmanager
    def _calibrating(self):
        """Forward passes of our own: not recorded, no graph, eval mode (no dropout)."""
        was, self._busy = self.model.training, True
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self._busy = False
            self.model.train(was)

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
        from ..calibration.calibrate import layerwise_statistics
        from ..structured.criteria import get_criterion
        from ..structured.score import score_layers
        from ..structured.select import plan_pruning, removal_counts

        adapter = get_adapter(self.model)
        cfg = self.config.prune_config()
        stats = None
        if get_criterion(cfg.method).needs_calibration:
            with self._calibrating():
                stats = layerwise_statistics(self.model, adapter, self._batches(self.config.select_batches),
                                             progress=False, rerun=False)
        scores = score_layers(self.model, adapter, cfg, stats)
        counts = None
        if cfg.allocation == "global":
            counts = removal_counts(cfg, scores, *self._min_keep(adapter, scores))
        return plan_pruning(self.model, adapter, cfg, scores, counts)

    def _min_keep(self, adapter: ArchAdapter, scores: list[LayerScores]) -> tuple[list[float], list[float]]:
        """Per-layer smallest kept fractions, ``1 - cap``, for the layers with heads / a dense FFN. A cap is never
        below the target itself, so the uniform allocation always fits (the paper's cap would forbid any
        head removal in an 8-head layer: 0.75 * (1 - exp(-0.015 * 8)) = 9%, less than one head)."""
        c = self.config
        heads, neurons = [], []
        for layer, s in zip(adapter.decoder_layers(self.model), scores):
            attn, ffn = adapter.attention(layer), adapter.ffn(layer)
            if s.q_heads is not None:
                cap = max(c.heads, layer_cap(attn.num_heads * attn.head_dim, c.cap_limit, c.cap_rate))
                heads.append(1 - cap - 1e-9)  # 1e-9: 1 - 0.3 = 0.7000000000000001 must not cost a unit
            if s.neurons is not None:
                neurons.append(1 - max(c.ffn, layer_cap(ffn.num_neurons, c.cap_limit, c.cap_rate)) - 1e-9)
        return heads, neurons

    @torch.no_grad()
    def _penalise(self, lr: float) -> None:
        """Decay the weights of the units the latest selection would remove by ``(1 - reg * lr / peak lr)``."""
        if self.reg <= 0 or not self.plans:
            return
        adapter = get_adapter(self.model)
        factor = max(0.0, 1 - self.reg * lr / max(self._peak_lr, lr, 1e-30))
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
        self._peak_lr = max(self._peak_lr, lr)
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
            if (self.penalty_from is None and len(self.stability) >= 2
                    and self.stability[-1] - self.stability[-2] < self.config.flat):
                self.penalty_from = step
            if self.penalty_from is not None:  # once started, the penalty grows every selection
                self.reg += self.config.penalty_step
        cap = math.ceil(self.config.commit_by * self.total_steps)
        if (self.stability and self.stability[-1] >= self.config.threshold) or step >= cap:
            return self._commit(step)
        return None

    def _commit(self, step: int) -> PrunePlan:
        """Remove the selected units for good (refitting the output projections when ``refit``)."""
        from ..structured.sequential import prune_sequential
        from ..structured.apply import apply_plan

        plan = self.plans[-1]
        if self.peft is not None:
            self.peft.merge_and_unload()  # adapters into the weights, LoRA modules back to plain ones
            self.peft = None
        if self.config.refit:
            adapter = get_adapter(self.model)
            batches = self._batches(self.config.refit_batches)
            with self._calibrating():
                plan = prune_sequential(self.model, adapter, self.config.prune_config(), batches, plan=plan,
                                        progress=False, fixed_scores=pinned_scores(self.model, adapter, plan))
        else:
            apply_plan(self.model, plan)
        self._hook.remove()
        self._recent.clear()
        self.committed_at = step
        return plan

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
        if self.penalty_from is not None:
            ax.axvline(self.penalty_from, color="orange", ls=":", label=f"penalty from step {self.penalty_from}")
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
