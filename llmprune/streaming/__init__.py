"""Prune or sparsify a model larger than memory, one decoder layer at a time, resumably.

The in-memory path loads the whole model, prunes it and saves it. The streaming path never holds more
than one decoder layer's weights (plus the embeddings, the final norm and the LM head):

1. the model skeleton is built on the meta device (:func:`build_skeleton`); only the non-layer weights are
   read from the checkpoint (a folder, :class:`Checkpoint`, or a loaded model dispatched with accelerate's
   ``device_map`` / ``cpu_offload``, :class:`llmprune.checkpoint.dispatched.ModelSource`, which is only read);
2. every layer-by-layer pass of the in-memory path (:func:`llmprune.calibration.calibrate.layerwise_statistics`,
   :func:`llmprune.structured.sequential.prune_sequential`, the sparsity loop) runs unchanged with a
   :class:`LayerStream` as its :class:`~llmprune.calibration.calibrate.LayerIO`: on ``enter`` the layer's tensors are
   read from the safetensors shards, on ``leave`` the pruned layer is written to its own output shard
   (read back and compared bit for bit), freed back to the meta device, and the hidden states that feed the
   next layer are saved as the resume point;
3. structured pruning that needs every layer's scores first (global, ``error`` and ``block_influence``
   allocations) runs a streamed scoring pass first, then a streamed cutting pass;
4. the config, tokenizer, recipe, plan, model card and shard index are written, the key set and shapes are
   checked with the loader a user would use (on the meta device), and the folder is renamed into place.

Because the passes are the in-memory passes, the saved tensors are bit-identical to the in-memory output.

A run's state lives in ``.<out>.partial/`` next to the output (finished layers' shards, the hidden states
entering the next layer, the scoring pass's per-layer results, ``stream_state.json``); ``resume=True``
continues a killed run from the last finished layer, refusing state written for other settings.

Example::

    result = prune_streaming("llama-70b/", PruneConfig(heads=0.25, ffn=0.25), "out/", calibration="c4")
"""

from __future__ import annotations

from ..core.memory import available_memory
from .source import (StreamingError, Checkpoint, build_skeleton, checkpoint_bytes, memory_budget, parse_memory,
                     refuse_gguf, should_stream, key_renames)
from .resume import STATE_FILE, STATE_VERSION, PartialOutput
from .layers import LayerStream
from .prune import prune_streaming, StreamResult
from .sparsify import sparsify_streaming

__all__ = ["StreamingError", "Checkpoint", "build_skeleton", "LayerStream", "prune_streaming",
           "sparsify_streaming", "StreamResult", "checkpoint_bytes", "available_memory", "memory_budget", "parse_memory",
           "should_stream", "refuse_gguf"]
