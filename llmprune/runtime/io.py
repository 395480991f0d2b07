"""Save / reload a sparsified Hugging Face model (safetensors only, never pickle).

Directory layout written by ``save_compressed(model, out_dir)``::

    out_dir/
      config.json              the model's transformers config (``model.config``)
      generation_config.json   if the model has one
      model.safetensors        every tensor of ``model.state_dict()`` (tied duplicates dropped)
      sparse_config.json       {"format": "llmprune-sparse", "version": 1,
                                "sparsify_config": KernelConfig.to_dict() or null,
                                "modules": {module name: {"type": ..., shape fields}},
                                "tied": {dropped key: kept key}}

Tensors of the kernel-backed modules in ``model.safetensors`` (``<m>`` = module name):

* ``act_sparse_linear``: ``<m>.weight_t`` [in, out] (= Linear.weight.T, model dtype),
  ``<m>.threshold`` fp32 scalar, ``<m>.bias`` [out] if any.
* ``sparse24_linear``: ``<m>.values`` [out, in/2] (model dtype), ``<m>.meta`` uint8
  [out, ceil(in/8)], ``<m>.threshold`` fp32 scalar (0 = off), ``<m>.bias`` if any.
  Value j of row n is ``W[n, 4*(j//2) + ((meta[n, j//4] >> 2*(j%4)) & 3)]`` (see
  ``llmprune.kernels.sparse24_gemm``).
* ``gather_swiglu_mlp``: ``<m>.w_gate``, ``<m>.w_up`` [I, H], ``<m>.w_down_t`` [I, H]
  (= down_proj.weight.T), ``<m>.idx`` int64 [kept].

All other tensors keep their usual transformers names. The write is atomic: everything goes to a
temporary directory next to ``out_dir`` which is renamed to ``out_dir`` at the end; an existing
``out_dir`` is refused unless ``overwrite=True``. After ``use_kernels``, ``model.save_pretrained(dir)`` writes
this format too (``bind_save_pretrained``).

Why this format and not compressed-tensors' ``sparse-24-bitmask``: it holds exactly the 2:4 kernel's operands
and what compressed-tensors has no field for (activation thresholds, gathered neuron indices), at the same size
(half the values + 1 bit per weight), and no current reader decompresses compressed-tensors sparse formats
(compressed-tensors >= 0.15, transformers 5.x, vLLM dropped them; see ``llmprune.checkpoint.compressed_tensors``).
"""
from __future__ import annotations

import json
import os

from torch import nn

from .modules import ActSparseLinear, GatherSwiGLUMLP, Sparse24Linear
from .convert import KernelConfig

__all__ = ["save_compressed", "load_compressed", "bind_save_pretrained", "FORMAT", "VERSION"]

FORMAT = "llmprune-sparse"
VERSION = 1
_TYPES = {ActSparseLinear: "act_sparse_linear", Sparse24Linear: "sparse24_linear", GatherSwiGLUMLP: "gather_swiglu_mlp"}


def _describe(m: nn.Module) -> dict:
    kind = _TYPES[type(m)]
    if kind == "gather_swiglu_mlp":
        return {"type": kind, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
                "n_keep": int(m.idx.numel())}
    return {"type": kind, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "threshold": m.threshold_value}


def _build(desc: dict, device, dtype) -> nn.Module:
    kind = desc["type"]
    if kind == "act_sparse_linear":
        return ActSparseLinear(desc["in_features"], desc["out_features"], desc["bias"], desc["threshold"], device, dtype)
    if kind == "sparse24_linear":
        return Sparse24Linear(desc["in_features"], desc["out_features"], desc["bias"], desc["threshold"], device, dtype)
    if kind == "gather_swiglu_mlp":
        return GatherSwiGLUMLP(desc["hidden_size"], desc["intermediate_size"], desc["n_keep"], device, dtype)
    raise ValueError(f"unknown sparse module type {kind!r}")


def _dedupe(sd: dict) -> tuple[dict, dict]:
    seen, out, tied = {}, {}, {}
    for k, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) \
            if t.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.detach().to("cpu").contiguous()
    return out, tied


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = False, verify: bool = True) -> str:
    """Write ``model`` (after ``use_kernels``) atomically to ``out_dir``; returns its path.

    An existing ``out_dir`` is refused unless ``overwrite`` (see :class:`llmprune.checkpoint.io.atomic_directory`).
    Before the rename the folder is checked: every tensor's name and shape in the written file, and with
    ``verify=True`` (default) the outputs of the model :func:`load_compressed` rebuilds on a short batch
    (:func:`llmprune.checkpoint.verify.verify_saved_model`). A failed check leaves nothing behind.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..checkpoint.io import atomic_directory, drop_custom_code
    from ..checkpoint.verify import VerificationError, verify_saved_model

    modules = {n: _describe(m) for n, m in model.named_modules() if type(m) in _TYPES}
    tensors, tied = _dedupe(model.state_dict())
    cfg = getattr(model, "llmprune_kernel_config", None)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "sparsify_config": cfg.to_dict() if isinstance(cfg, KernelConfig) else None,
        "modules": modules,
        "tied": tied,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if getattr(model, "config", None) is not None:
            model.config.save_pretrained(tmp)
            drop_custom_code(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt", "llmprune": FORMAT})
        with open(os.path.join(tmp, "sparse_config.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
            written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if written != {k: tuple(v.shape) for k, v in tensors.items()}:
            raise VerificationError(f"{tmp}/model.safetensors does not hold the model's tensors")
        if verify:
            verify_saved_model(model, tmp, full=True, loader=load_compressed)
    return os.path.abspath(os.fspath(out_dir))


def bind_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained(dir)`` write the compressed format (so ``push_to_hub`` does too).

    An existing empty folder (as ``push_to_hub`` passes) is replaced; a non-empty one is refused
    unless ``overwrite=True``.
    """

    def save_pretrained(save_directory: str | os.PathLike, overwrite: bool = False, **_: object) -> str:
        path = os.fspath(save_directory)
        empty = os.path.isdir(path) and not os.listdir(path)
        return save_compressed(model, path, overwrite=overwrite or empty)

    model.save_pretrained = save_pretrained  # instance attribute: the class is untouched


def load_compressed(path: str | os.PathLike, device=None) -> nn.Module:
    """Rebuild a model saved by ``save_compressed``: the transformers architecture from config.json,
    the kernel-backed modules from sparse_config.json, all tensors from model.safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    with open(os.path.join(path, "sparse_config.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"load_compressed: {path} is not a {FORMAT} v<= {VERSION} checkpoint")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # never run a folder's code
    sd = load_file(os.path.join(path, "model.safetensors"))
    dtype = next((t.dtype for k, t in sd.items() if t.is_floating_point() and not k.endswith("threshold")), None)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False,
                                             **({"dtype": dtype} if dtype is not None else {}))
    for name, desc in meta["modules"].items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _build(desc, "cpu", dtype))
    res = model.load_state_dict(sd, strict=False, assign=True)
    missing = set(res.missing_keys) - set(meta["tied"])
    if missing or res.unexpected_keys:
        raise ValueError(f"load_compressed: missing {sorted(missing)[:5]}, unexpected {res.unexpected_keys[:5]}")
    for dropped, kept in meta["tied"].items():  # re-tie (e.g. lm_head.weight -> embed_tokens.weight)
        mod_name, _, attr = dropped.rpartition(".")
        kmod, _, kattr = kept.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(kmod), kattr))
    if meta.get("sparsify_config") is not None:
        model.llmprune_kernel_config = KernelConfig.from_dict(meta["sparsify_config"])
    if device is not None:
        model.to(device)
    bind_save_pretrained(model)
    return model.eval()
