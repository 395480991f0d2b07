"""The one-call entry point of structured pruning, in the order a reader follows it:
calibrate (:mod:`.calibrate`) -> score (:mod:`.score`) -> select (:mod:`.select`, with the ``error`` /
``block_influence`` counts from :mod:`.allocate`) -> compensate (:mod:`.compensate`) -> cut
(:mod:`.surgery`); saving is :mod:`.io`. With ``reconstruct`` the cut happens layer by layer in
:mod:`.sequential`, each layer re-scored on the already pruned model's activations and its output
projections refitted (:mod:`.reconstruct`).

Example::

    from llmprune import PruneConfig, prune
    result = prune(model, PruneConfig(heads=0.25, ffn=0.25, method="wanda"),
                   tokenizer=tok, calibration="calib.txt")
    result.model      # the same object, now smaller
    result.plan       # kept indices per layer (saved next to the model)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..calibration.calibrate import (CalibrationError, as_batches, calibration_text, check_calibration_fits,
                                     layerwise_statistics)
from .compensate import add_deltas, compensation_deltas, enable_biases, zero_deltas
from ..core.config import LayerPlan, PruneConfig, PrunePlan
from .criteria import get_criterion, get_unit_criterion
from ..checkpoint.dispatched import check_not_dispatched
from .score import LayerScores, score_layer, score_layers
from .select import check_ratios, plan_pruning, resolve_config
from .allocation import block_influence_counts, error_counts, layer_cost_curves
from .sequential import output_modules, prune_sequential
from .apply import apply_plan
from ..arch.surgery import count_parameters

__all__ = ["prune", "PruneResult", "count_parameters"]


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan
    config: PruneConfig
    params_before: int
    params_after: int
    scores: list[LayerScores] = field(default_factory=list, repr=False)
    #: ``params``: the candidate splits measured and the one chosen (:func:`llmprune.structured.budget.choose_split`)
    budget: dict[str, Any] | None = None
    #: ``vocab``: the rewritten tokenizer that belongs to the pruned model (the original no longer fits it)
    tokenizer: Any = None

    def save(self, out_dir: str | os.PathLike, tokenizer: Any = None, source: str | None = None,
             overwrite: bool = False) -> Any:
        """Save the pruned model with its recipe and plan (see :func:`llmprune.checkpoint.io.save_pruned`), and
        its tokenizer: :attr:`tokenizer` when the vocabulary was pruned, else ``tokenizer``."""
        from ..checkpoint.io import save_pruned

        extra: dict[str, Any] = {"params_before": self.params_before, "params_after": self.params_after}
        if self.budget:
            extra["params_budget"] = self.budget
        return save_pruned(self.model, out_dir, tokenizer=self.tokenizer if self.tokenizer is not None else tokenizer,
                           config=self.config, plan=self.plan, source=source, overwrite=overwrite, extra=extra)


_PREPARED_FIELDS = ("grad_rows", "grad_cols", "label_sums", "label_counts", "readout", "solo_gain")


def _adopt_gradients(stats: Any, grad_stats: list | None, i: int) -> None:
    """Copy layer ``i``'s statistics from a criterion's own pass (``Criterion.prepare``: Taylor sums, per-label
    readouts, gathered on the dense model) into the layer-wise pass's statistics."""
    if grad_stats is None:
        return
    for module, s in grad_stats[i].inputs.items():
        target = stats.inputs.setdefault(module, type(s)())
        for name in _PREPARED_FIELDS:
            setattr(target, name, getattr(s, name))


def prune(
    model: nn.Module,
    config: PruneConfig,
    tokenizer: Any = None,
    calibration: str | os.PathLike | torch.Tensor | Sequence[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place according to ``config`` and return the result with its plan.

    Args:
        calibration: a text file path, a ``[n, seq_len]`` tensor of token ids, or a list of batches.
            Needed by activation-aware criteria and by layer removal.
        device: where each layer runs during calibration (the model may stay on CPU).

    A model dispatched with accelerate (offloaded weights, several devices) is refused with a
    :class:`~llmprune.checkpoint.dispatched.DispatchedModelError` naming :func:`llmprune.streaming.prune_streaming`,
    which prunes it one layer at a time into a checkpoint folder.

    With ``config.vocab`` the vocabulary is pruned last (:mod:`.vocab`) and ``result.tokenizer`` is the rewritten
    tokenizer, the one to use (and save) with the pruned model.
    """
    config.validate()
    check_not_dispatched(model, "prune")
    adapter = get_adapter(model)
    if config.vocab > 0:
        return _prune_then_vocab(model, adapter, config, tokenizer, calibration, device, progress)
    if config.hidden > 0 or config.params > 0:
        return _prune_width(model, adapter, config, tokenizer, calibration, device, progress)
    criterion = get_criterion(config.method)
    config = resolve_config(model, adapter, config)  # "auto" unit, default allocation -> concrete, once
    check_ratios(model, adapter, config)
    prunes_units = config.heads > 0 or config.ffn > 0
    if criterion.run is not None and prunes_units and (config.layers or config.experts):
        return _layers_then_units(model, adapter, config, criterion, tokenizer, calibration, device, progress)
    layers, experts = get_unit_criterion("layers"), get_unit_criterion("experts")  # their own criteria
    needs_data = ((criterion.needs_calibration or config.bias_compensation or config.reconstruct
                   or config.allocation in ("error", "block_influence")) and prunes_units) \
        or (config.layers > 0 and layers.needs_calibration) or (config.experts > 0 and experts.needs_calibration)
    if calibration is not None:  # before any tokenizing: windows within the context, states within memory
        check_calibration_fits(model.config, config.n_samples, config.seq_len, context=False)
    batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
    if needs_data and batches is None:
        why = ("bias compensation" if config.bias_compensation else "reconstruction" if config.reconstruct
               else f"{config.allocation} allocation" if config.allocation in ("error", "block_influence") else "")
        raise CalibrationError(
            f"method {config.method!r}{f' with {why}' if why else ''}"
            f"{' (and layer removal)' if config.layers else ''} needs calibration data: "
            "pass calibration=<text file> (CLI: --calib FILE)"
        )
    params_before = count_parameters(model)
    was_training = model.training
    model.eval()
    if criterion.run is not None and prunes_units:  # a method that selects inside the sequential pass
        plan = criterion.run(model, adapter, config, batches, device, progress)
        model.train(was_training)
        return PruneResult(model, plan, config, params_before, count_parameters(model), [])
    # A criterion with optional calibration (expert removal: routing mass) reads it whenever it is given.
    use_data = needs_data or (batches is not None and ((config.experts > 0 and experts.uses_calibration)
                                                       or (config.layers > 0 and layers.uses_calibration)))
    reconstruct = config.reconstruct and prunes_units
    # A first, dense pass decides the counts unless reconstruction alone (uniform counts) needs none.
    first_pass = criterion.prepare is not None or not (
        reconstruct and config.allocation == "uniform" and not config.layers and not config.experts
        and not any(adapter.experts(layer) is not None for layer in adapter.decoder_layers(model)))
    stats = scores = plan = None
    counts = None
    if first_pass:
        curves: list = []
        error_alloc = config.allocation == "error" and prunes_units

        def price_layer(i: int, layer: nn.Module, layer_stats: Any) -> None:  # error allocation: cost curves
            curves.append(layer_cost_curves(adapter, layer, config, score_layer(adapter, layer, config, layer_stats),
                                            layer_stats))
            layer_stats.grams.clear()

        if use_data and criterion.prepare is not None and prunes_units:  # e.g. gradients, before the layer pass
            stats = criterion.prepare(model, adapter, batches, progress, **criterion.options_of(config))
        if use_data:
            grad_stats = stats

            def priced(i: int, layer: nn.Module, layer_stats: Any) -> None:
                _adopt_gradients(layer_stats, grad_stats, i)
                price_layer(i, layer, layer_stats)

            stats = layerwise_statistics(model, adapter, batches, device=device, progress=progress,
                                         on_layer=priced if error_alloc else None,
                                         grams_of=(lambda layer: output_modules(adapter, layer)) if error_alloc else None)
            for i, layer_stats in enumerate(stats):
                _adopt_gradients(layer_stats, grad_stats, i)
        scores = score_layers(model, adapter, config, stats)
        if error_alloc:
            counts = error_counts(model, adapter, config, curves)
        elif config.allocation == "block_influence" and prunes_units:
            counts = block_influence_counts(model, adapter, config, [s.block_influence for s in stats])
        plan = plan_pruning(model, adapter, config, scores, counts)
    if reconstruct:
        if config.bias_compensation:  # biases are created here and refitted with the weights
            enable_biases(adapter, model, zero_deltas(adapter, model))
        plan = prune_sequential(model, adapter, config, batches, plan, device=device, progress=progress,
                                fixed_scores=scores if criterion.prepare is not None else None)
    else:
        deltas = compensation_deltas(adapter, model, plan, stats) if config.bias_compensation and stats else []
        enable_biases(adapter, model, deltas)
        apply_plan(model, plan, adapter)
        add_deltas(deltas)
    model.train(was_training)
    return PruneResult(model, plan, config, params_before, count_parameters(model), scores or [])


def _layers_then_units(model: nn.Module, adapter: Any, config: PruneConfig, criterion: Any, tokenizer: Any,
                       calibration: Any, device: Any, progress: bool) -> PruneResult:
    """Layers and experts go first, by their own criteria (Block Influence, routing mass); then a method that
    selects inside the sequential pass (``obs``) prunes heads and neurons of what is left. One plan, in the
    original layer numbering."""
    params_before = count_parameters(model)
    # the calibration text is tokenized once, and both stages draw the same windows from it
    batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
    first = prune(model, dataclasses.replace(config, heads=0.0, ffn=0.0), calibration=batches, device=device,
                  progress=progress)
    units = dataclasses.replace(config, layers=0, experts=0.0)
    second = prune(model, units, calibration=batches, device=device, progress=progress)
    plan = first.plan
    for j, i in enumerate(plan.kept_layers):
        lp, inner = plan.layers[i], second.plan.layers[j]
        lp.kept_heads, lp.kept_kv_heads, lp.kept_neurons = inner.kept_heads, inner.kept_kv_heads, inner.kept_neurons
    return PruneResult(model, plan, config, params_before, count_parameters(model))


def _prune_then_vocab(model: nn.Module, adapter: Any, config: PruneConfig, tokenizer: Any, calibration: Any,
                      device: Any, progress: bool) -> PruneResult:
    """``vocab``: the kept tokens and the rewritten tokenizer are chosen first (a refusal changes nothing), the other
    kinds are pruned with the original tokenizer, then the embedding and LM-head rows are cut."""
    from .vocab import choose_vocab, prune_vocab, vocab_source

    rest = dataclasses.replace(config, vocab=0.0, vocab_text=None)
    if isinstance(calibration, (str, os.PathLike)) and not config.vocab_text:
        calibration = vocab_source(config, calibration)  # read once, for the counts and the other kinds
    selection = choose_vocab(model, config, tokenizer, calibration)
    params_before = count_parameters(model)
    if rest.heads or rest.ffn or rest.layers or rest.experts or rest.hidden or rest.params:
        inner = prune(model, rest, tokenizer=tokenizer, calibration=calibration, device=device, progress=progress)
        plan, done, scores, budget = inner.plan, inner.config, inner.scores, inner.budget
    else:
        plan = PrunePlan(layers=[LayerPlan() for _ in adapter.decoder_layers(model)])
        done, scores, budget = rest, [], None
    prune_vocab(model, selection.kept)
    plan.kept_tokens = selection.kept
    if str(model.config.model_type) != selection.model_type:  # per-layer widths: AutoTokenizer may pick another class
        from ..checkpoint.tokenizer_prune import prune_tokenizer

        selection.tokenizer = prune_tokenizer(tokenizer, selection.kept, model.config)
    return PruneResult(model, plan, dataclasses.replace(done, vocab=config.vocab, vocab_text=config.vocab_text),
                       params_before, count_parameters(model), scores, budget, tokenizer=selection.tokenizer)


def _prune_width(model: nn.Module, adapter: Any, config: PruneConfig, tokenizer: Any, calibration: Any, device: Any,
                 progress: bool) -> PruneResult:
    """``hidden`` / ``params``: (choose the split,) cut the hidden channels, then prune heads, FFN neurons, layers
    and experts of the narrower model with the run's method (each stage calibrated on the model it cuts); a split
    with vocabulary rows goes through :func:`_prune_then_vocab`, with the split's report."""
    from .budget import choose_split
    from .hidden import choose_hidden, prune_hidden
    from ..checkpoint.perlayer import set_config_widths

    get_criterion(config.method)  # unknown method: fail before any work
    check_ratios(model, adapter, resolve_config(model, adapter, config))
    text = calibration_text(calibration) if config.params > 0 else None  # read once: windows, held-out part, vocab
    batches = as_batches(calibration if text is None else text, tokenizer, config.n_samples, config.seq_len,
                         config.seed, config.batch_size)
    if batches is None:
        raise CalibrationError(f"{'--params' if config.params else 'hidden-dimension pruning'} needs calibration "
                               "data: pass calibration=<text file> (CLI: --calib FILE)")
    params_before = count_parameters(model)
    was_training = model.training
    model.eval()
    budget = None
    if config.params > 0:
        config, budget = choose_split(model, adapter, config, batches, prune, device=device, progress=progress,
                                      tokenizer=tokenizer, text=text)
        if config.vocab > 0:  # the split takes vocabulary rows: that stage prunes the rest, then cuts the rows
            model.train(was_training)
            result = _prune_then_vocab(model, adapter, config, tokenizer, text, device, progress)
            result.budget = budget
            return result
    kept, scales = None, None
    if config.hidden > 0:
        kept, scales = choose_hidden(model, adapter, config, batches, progress=progress)
        prune_hidden(model, adapter, kept, scales)
        set_config_widths(model, adapter)
    blocks = dataclasses.replace(config, hidden=0.0)
    if blocks.heads or blocks.ffn or blocks.layers or blocks.experts:
        inner = prune(model, blocks, calibration=batches, device=device, progress=progress)
        plan, blocks = inner.plan, inner.config
    else:
        plan = PrunePlan(layers=[LayerPlan() for _ in adapter.decoder_layers(model)])
    plan.kept_hidden, plan.hidden_norm_scales = kept, scales
    model.train(was_training)
    return PruneResult(model, plan, dataclasses.replace(blocks, hidden=config.hidden), params_before,
                       count_parameters(model), budget=budget)
