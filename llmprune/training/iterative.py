"""Iterative pruning: reach the target in ``k`` steps, recalibrating on the current model and recovering in
between (the seed overview's iterative vs one-shot).

Step ``i`` removes what takes the model from ``r·(i-1)/k`` to ``r·i/k`` of its *original* units (as a fraction
of what is left: ``(r/k) / (1 - r·(i-1)/k)``), with statistics gathered on the model as it is after the
previous steps; ``recover_steps`` of recovery training follow every step but the last (the final recovery is
the caller's, e.g. ``recover`` in a recipe). Whole layers and experts are removed in the first step.

Example::

    result = prune_iteratively(model, PruneConfig(heads=0.5, ffn=0.5, method="wanda"), steps=3,
                               recovery=RecoveryConfig(steps=100), data="train.txt", tokenizer=tok)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.config import PruneConfig
from ..structured.pipeline import PruneResult, count_parameters, prune
from .recover import RecoveryConfig, RecoveryResult, recover

__all__ = ["step_fraction", "prune_iteratively", "IterativeResult"]


def step_fraction(target: float, steps: int, i: int) -> float:
    """Fraction of the *remaining* units step ``i`` (1-based) removes so that after it ``target·i/steps`` of the
    original units are gone."""
    if not 1 <= i <= steps:
        raise ValueError(f"step {i} is outside 1..{steps}")
    done, goal = target * (i - 1) / steps, target * i / steps
    return (goal - done) / (1 - done) if done < 1 else 0.0


@dataclass
class IterativeResult:
    model: nn.Module
    steps: list[PruneResult] = field(default_factory=list)
    recoveries: list[RecoveryResult] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0


def prune_iteratively(
    model: nn.Module,
    config: PruneConfig,
    steps: int,
    recovery: RecoveryConfig | None = None,
    data: Any = None,
    tokenizer: Any = None,
    calibration: Any = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
    device: Any = None,
) -> IterativeResult:
    """Prune ``model`` to ``config``'s fractions in ``steps`` steps with recovery in between; returns the model
    (LoRA merged after every recovery, so each step prunes a plain model)."""
    if steps < 1:
        raise ValueError(f"iterative steps={steps!r} must be >= 1")
    if steps > 1 and (config.hidden or config.params):
        raise ValueError("iterative pruning does not take hidden / params yet: prune the hidden size in one step")
    if steps > 1 and config.vocab:
        raise ValueError("iterative pruning does not take vocab yet (every step would need the rewritten tokenizer): "
                         "prune the vocabulary in one step")
    if steps > 1 and recovery is not None and data is None:
        from ..calibration.calibrate import CalibrationError

        raise CalibrationError("recovery between iterative steps needs training data (--data)")
    from ..arch import get_adapter
    from ..structured.select import resolve_config

    config = resolve_config(model, get_adapter(model), config)  # "auto" resolved once, on the unpruned model
    result = IterativeResult(model=model, params_before=count_parameters(model))
    for i in range(1, steps + 1):
        step_cfg = dataclasses.replace(
            config,
            heads=step_fraction(config.heads, steps, i), ffn=step_fraction(config.ffn, steps, i),
            experts=config.experts if i == 1 else 0.0, layers=config.layers if i == 1 else 0)
        result.steps.append(prune(model, step_cfg, tokenizer=tokenizer, calibration=calibration, device=device,
                                  progress=progress))
        if i < steps and recovery is not None:
            rec = recover(model, recovery, data=data, tokenizer=tokenizer, teacher=teacher, progress=progress)
            model = rec.model
            result.recoveries.append(rec)
    result.model = model
    result.params_after = count_parameters(model)
    return result
