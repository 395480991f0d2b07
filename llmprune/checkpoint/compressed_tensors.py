"""compressed-tensors *sparse* checkpoints (``sparse-bitmask``, ``sparse-24-bitmask``, ``marlin-24``): detected and
refused by :func:`llmprune.load_model`, never written.

Such a checkpoint stores each sparsified Linear weight as ``<name>.weight.bitmask`` (packed bits),
``.compressed`` (the non-zero values), ``.shape`` and, for ``sparse-bitmask``, ``.row_offsets``, described by
``quantization_config.sparsity_config`` in ``config.json``. The stack llmprune runs on no longer reads it:
compressed-tensors removed its sparse compressors in 0.15 (vllm-project/compressed-tensors#610), transformers 5.x
requires compressed-tensors >= 0.15 and ignores ``sparsity_config`` (huggingface/transformers#46342), and vLLM
removed its Sparse24 integration (vllm-project/vllm#36799). ``AutoModelForCausalLM.from_pretrained`` then reports
every sparsified weight as *missing* and initialises it at random (a warning, no error), so llmprune refuses the
folder with one :class:`~llmprune.checkpoint.io.CheckpointError` line instead. ``llmprune sparsify`` writes dense safetensors
(zeros kept; read by transformers and vLLM) and ``llmprune.runtime.save_compressed`` the kernel format; see the
README, "Sparse checkpoint formats".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SPARSE_FORMATS", "sparse_compression_format", "refuse_sparse_compressed"]

#: compressed-tensors formats whose weights are stored compressed as sparse tensors
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "marlin-24")


def sparse_compression_format(folder: str | Path, headers: dict[str, dict[str, Any]] | None = None) -> str | None:
    """The compressed-tensors sparse format of the checkpoint in ``folder`` (e.g. ``"sparse-bitmask"``), or
    ``None``. Read from ``config.json`` (``quantization_config.sparsity_config.format``, or a quantization
    ``format`` of ``marlin-24``), else from tensor names: a ``*.bitmask`` tensor in ``headers`` (safetensors
    file name -> header) means a sparse-bitmask layout whatever the config says."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        sc = qc.get("sparsity_config")
        if isinstance(sc, dict) and sc.get("format") in SPARSE_FORMATS:
            return str(sc["format"])
        if qc.get("format") in SPARSE_FORMATS:
            return str(qc["format"])
    for header in (headers or {}).values():
        if any(name.endswith(".bitmask") for name in header):
            return "sparse-bitmask"
    return None


def refuse_sparse_compressed(folder: str | Path, headers: dict[str, dict[str, Any]] | None = None) -> None:
    """Raise :class:`~llmprune.checkpoint.io.CheckpointError` (one line) if ``folder`` holds compressed-tensors sparse
    weights, which transformers 5.x would load as random weights."""
    fmt = sparse_compression_format(folder, headers)
    if fmt is None:
        return
    from .errors import CheckpointError

    raise CheckpointError(
        f"{folder} holds compressed-tensors '{fmt}' weights (bitmask-compressed sparse layers): transformers 5.x "
        "with compressed-tensors >= 0.15 no longer decompresses them and would load those layers as random "
        "weights; decompress it to a dense checkpoint with compressed-tensors <= 0.14 (transformers < 5) first")
