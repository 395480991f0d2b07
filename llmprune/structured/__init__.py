"""Structured pruning, in pipeline order: scoring units (``score``, with ``llmprune.structured.criteria``), choosing what
to keep (``select``), FLAP bias compensation (``compensate``), cutting weights (``surgery``, ``apply``),
per-layer configs and model classes (``perlayer``), refitting and non-uniform widths (``reconstruct``,
``sequential``), the hidden dimension (``hidden``) and parameter budgets across axes (``budget``), and the
entry point ``prune`` (``pipeline``).

May import: ``core``, ``arch``, ``calibration``, ``checkpoint``. Its methods (``criteria``) register themselves on import.
"""
