"""Shared building blocks with no pruning logic of their own: the configuration and plan records
(``config``), the statistics records that calibration fills and criteria read (``stats``), budget allocation
across layers (``allocate``), the process group (``distributed``), progress bars, memory helpers and the version.

May import: nothing else in llmprune (only torch and the standard library).
"""
