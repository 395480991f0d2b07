"""Calibration: text sources and dataset names (``text``), calibration windows and the layer-by-layer
statistics pass (``calibrate``), input Gram matrices (``hessian``), every norm's outputs (``norms``, for the
hidden axis), and
the extra statistics passes some criteria need (``gradients`` for Taylor, ``single_unit``). Structured
pruning, weight sparsity and training all read it.

May import: ``core``, ``arch``.
"""
