"""Weight sparsity (unstructured and N:M; magnitude, Wanda, SparseGPT, ALPS, RIA; uniform or OWL per-layer
sparsity) and dynamic activation sparsity (TEAL-style per-layer thresholds).

Example::

    from llmprune.sparsity import SparsityConfig, sparsify, calibrate_activation_thresholds
    report = sparsify(model, SparsityConfig(method="wanda", sparsity=0.5), tokenizer=tok,
                              calibration="calib.txt")
    thresholds = calibrate_activation_thresholds(model, tok, "calib.txt", sparsity=0.4)
    handle = apply_activation_sparsity(model, thresholds)   # reference forward pre-hooks
"""

from .activation import (
    ActivationSparsityHandle,
    apply_activation_sparsity,
    calibrate_activation_thresholds,
    measure_activation_sparsity,
    read_activation_thresholds,
)
from .alps import alps_prune, masked_least_squares
from .api import ALLOCATIONS, METHODS, SparsityConfig, SparsityReport, sparsify, weight_sparsity
from .magnitude import magnitude_mask, magnitude_scores
from .masks import mask_sparsity, nm_mask, num_pruned, parse_pattern, unstructured_mask
from .owl import outlier_ratio, owl_ratios
from .ria import ria_mask, ria_scores
from .sparsegpt import HessianAccumulator, inverse_hessian_cholesky, sparsegpt_prune, sparsegpt_prune_group
from .wanda import wanda_mask, wanda_scores

__all__ = [
    "SparsityConfig",
    "SparsityReport",
    "sparsify",
    "weight_sparsity",
    "METHODS",
    "ALLOCATIONS",
    "alps_prune",
    "masked_least_squares",
    "ria_scores",
    "ria_mask",
    "outlier_ratio",
    "owl_ratios",
    "unstructured_mask",
    "nm_mask",
    "num_pruned",
    "parse_pattern",
    "mask_sparsity",
    "magnitude_scores",
    "magnitude_mask",
    "wanda_scores",
    "wanda_mask",
    "HessianAccumulator",
    "sparsegpt_prune",
    "sparsegpt_prune_group",
    "inverse_hessian_cholesky",
    "calibrate_activation_thresholds",
    "apply_activation_sparsity",
    "measure_activation_sparsity",
    "ActivationSparsityHandle",
    "read_activation_thresholds",
]
