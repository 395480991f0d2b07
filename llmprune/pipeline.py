"""The one-call entry point of structured pruning, in the order a reader follows it:
calibrate (:mod:`.calibrate`) -> score (:mod:`.score`) -> select (:mod:`.select`) -> compensate
(:mod:`.compensate`) -> cut (:mod:`.surgery`); saving is :mod:`.io`.

Example::

    from llmprune import PruneConfig, prune
    result = prune(model, PruneConfig(heads=0.25, ffn=0.25, method="wanda"),
                   tokenizer=tok, calibration="calib.txt")
    result.model      # the same object, now smaller
    result.plan       # kept indices per layer (saved next to the model)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .arch import get_adapter
from .calibrate import CalibrationError, as_batches, layerwise_statistics
from .compensate import add_deltas, compensation_deltas, enable_biases
from .config import PruneConfig, PrunePlan
from .criteria import get_criterion
from .score import LayerScores, score_layers
from .select import check_ratios, plan_pruning
from .surgery import apply_plan

__all__ = ["prune", "PruneResult", "count_parameters"]


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan
    config: PruneConfig
    params_before: int
    params_after: int
    scores: list[LayerScores] = field(default_factory=list, repr=False)

    def save(self, out_dir: str | os.PathLike, tokenizer: Any = None, source: str | None = None,
             overwrite: bool = False) -> Any:
        """Save the pruned model with its recipe and plan (see :func:`llmprune.io.save_pruned`)."""
        from .io import save_pruned

        return save_pruned(self.model, out_dir, tokenizer=tokenizer, config=self.config, plan=self.plan,
                           source=source, overwrite=overwrite,
                           extra={"params_before": self.params_before, "params_after": self.params_after})


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


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
    """
    config.validate()
    adapter = get_adapter(model)
    criterion = get_criterion(config.method)
    check_ratios(model, adapter, config)
    needs_data = ((criterion.needs_calibration or config.bias_compensation) and (config.heads > 0 or config.ffn > 0)) \
        or config.layers > 0
    batches = as_batches(calibration, tokenizer, config.n_samples, config.seq_len, config.seed, config.batch_size)
    if needs_data and batches is None:
        raise CalibrationError(
            f"method {config.method!r}{' with bias compensation' if config.bias_compensation else ''}"
            f"{' (and layer removal)' if config.layers else ''} needs calibration data: "
            "pass calibration=<text file> (CLI: --calib FILE)"
        )
    params_before = count_parameters(model)
    was_training = model.training
    model.eval()
    # Expert removal uses routing statistics whenever calibration data is given (weight norms otherwise).
    use_data = needs_data or (config.experts > 0 and batches is not None)
    stats = layerwise_statistics(model, adapter, batches, device=device, progress=progress) if use_data else None
    scores = score_layers(model, adapter, config, stats)
    plan = plan_pruning(model, adapter, config, scores)
    deltas = compensation_deltas(adapter, model, plan, stats) if config.bias_compensation and stats else []
    enable_biases(adapter, model, deltas)
    apply_plan(model, plan, adapter)
    add_deltas(deltas)
    model.train(was_training)
    return PruneResult(model, plan, config, params_before, count_parameters(model), scores)
