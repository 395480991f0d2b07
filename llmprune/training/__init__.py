"""Training a pruned model back: recovery fine-tuning (``recover``), prune-and-recover rounds (``iterative``)
and pruning during training (``one_cycle``).

May import: ``core``, ``arch``, ``calibration``, ``criteria``, ``checkpoint``, ``structured``.
"""
