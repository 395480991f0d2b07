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
from .api import SparsityConfig, SparsityReport, sparsify, weight_sparsity
from .cholesky import inverse_hessian_cholesky
from .masks import mask_sparsity, nm_mask, num_pruned, parse_pattern, unstructured_mask
from .owl import outlier_ratio, owl_ratios
from .registry import (ActivationSparsityMethod, SparsityAllocation, SparsityMethod, available_activation_methods,
                       available_sparsity_allocations, available_sparsity_methods, get_activation_method,
                       get_sparsity_allocation, get_sparsity_method, register_activation_method,
                       register_sparsity_allocation, register_sparsity_method)

# the weight-sparsity methods: importing each module registers it (one file and one registration per method)
from .alps import alps_prune, masked_least_squares
from .magnitude import magnitude_mask, magnitude_scores
from .ria import ria_mask, ria_scores
from .sparsegpt import HessianAccumulator, sparsegpt_prune, sparsegpt_prune_group
from .wanda import wanda_mask, wanda_scores

#: the registered weight-sparsity method names, sorted (a snapshot: :func:`available_sparsity_methods` is live)
METHODS = available_sparsity_methods()
#: the registered per-layer sparsity allocations (``uniform`` in :mod:`.api`, ``owl`` in :mod:`.owl`), sorted
ALLOCATIONS = available_sparsity_allocations()

__all__ = [
    "SparsityConfig",
    "SparsityReport",
    "sparsify",
    "weight_sparsity",
    "METHODS",
    "ALLOCATIONS",
    "SparsityMethod",
    "register_sparsity_method",
    "get_sparsity_method",
    "available_sparsity_methods",
    "SparsityAllocation",
    "register_sparsity_allocation",
    "get_sparsity_allocation",
    "available_sparsity_allocations",
    "ActivationSparsityMethod",
    "register_activation_method",
    "get_activation_method",
    "available_activation_methods",
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
