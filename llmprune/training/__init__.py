"""Training a pruned model back: recovery fine-tuning (``recover``), prune-and-recover rounds (``iterative``)
pruning during training (``one_cycle``), and whole runs from a recipe file (``recipe``: prune, recover, evaluate).

May import: ``core``, ``arch``, ``calibration``, ``checkpoint``, ``structured``, ``sparsity``, ``eval``.
"""
