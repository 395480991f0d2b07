"""Structured pruning, in pipeline order: the methods (``criteria``: per-unit scores and ``obs``, each registered
once) and ``score``, choosing what to keep (``select``), how many units each layer loses (``allocation``), FLAP
bias compensation (``compensate``), applying a plan (``apply``, on the weight slicing of
:mod:`llmprune.arch.surgery`), refitting (``reconstruct``) and the sequential pass (``sequential``), the hidden
dimension (``hidden``), parameter budgets across axes (``budget``), and the entry point ``prune`` (``pipeline``);
beside them, the per-layer single-unit analysis of ``llmprune analyze`` (``analyze``).

May import: ``core``, ``arch``, ``calibration``, ``checkpoint``.
"""
