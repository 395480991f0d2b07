"""Finishing a streamed run: the remaining weights, the shard index, config, tokenizer and metadata, checked
and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.dispatched import ModelSource
from ..checkpoint.io import read_safetensors_header, write_metadata
from .source import Checkpoint, key_renames, _tied_head
from .resume import PartialOutput, STATE_FILE
from .layers import _stored_names


# ---- finishing: shards, index, config, metadata ----------------------------------------------------------
def _finish(model: nn.Module, part: PartialOutput, prefixes: dict[int, str], ck: Checkpoint | ModelSource,
            tokenizer: Any, metadata: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from ..checkpoint.verify import verify_saved_model

    tied = _tied_head(model)
    in_layer = tuple(prefixes.values())
    rest = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if not n.startswith(in_layer) and n != tied and p.device.type != "meta"}
    save_file(_stored_names(rest, key_renames(model)), str(part.dir / "layers" / "rest.safetensors"),
              metadata={"format": "pt"})
    shards = sorted((part.dir / "layers").glob("layer-*.safetensors")) + [part.dir / "layers" / "rest.safetensors"]
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.replace(shard, part.dir / name)
        for key, v in read_safetensors_header(part.dir / name).items():
            weight_map[key] = name
            total += v["data_offsets"][1] - v["data_offsets"][0]  # the tensor's bytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (part.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(part.dir)
    _save_generation_config(ck, part.dir)
    if tokenizer is None and isinstance(ck, Checkpoint):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ck.folder), trust_remote_code=False)
        except (OSError, ValueError):
            pass  # a checkpoint without a tokenizer: the weights are what matters
    if tokenizer is not None:
        tokenizer.save_pretrained(part.dir)
    write_metadata(part.dir, model, **metadata)
    verify_saved_model(model, part.dir, full=False)  # key set and shapes, with the user's loader, on meta
    keep_names = {"layers", STATE_FILE}
    return part.finish(lambda p: p.name not in keep_names and not p.name.startswith("hidden-")
                       and not p.name.startswith("score-"))


def _save_generation_config(ck: Checkpoint | ModelSource, folder: Path) -> None:
    """The source's generation settings, as save_pretrained would keep them."""
    if isinstance(ck, Checkpoint):
        if (ck.folder / "generation_config.json").is_file():
            shutil.copyfile(ck.folder / "generation_config.json", folder / "generation_config.json")
    elif getattr(ck.model, "generation_config", None) is not None:
        ck.model.generation_config.save_pretrained(folder)
