"""Verify a saved model folder against the in-memory model *before* it is renamed into place.

A pruned model that reloads wrong is the worst failure a pruning tool can have, so every llmprune save
(``save_pruned`` for structured pruning and weight sparsity, ``save_compressed`` for kernel-backed models,
recovery saves) calls :func:`verify_saved_model` on its temporary folder:

- ``full=False`` (``--no-verify``): the folder is loaded with the loader a user would use onto the *meta*
  device (headers only, no weights read, no memory), and any missing, unexpected or mismatched key, or any
  parameter name/shape that differs from the in-memory model, fails the save.
- ``full=True`` (the default): additionally the folder is loaded for real (same dtype, device and
  attention implementation) and its outputs on a short fixed batch are compared with the in-memory model's.

Example::

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        verify_saved_model(model, tmp)          # raises VerificationError; atomic_directory cleans up
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

#: Keyword arguments of every ``from_pretrained`` llmprune calls: safetensors only, never remote code, and no
#: Hub kernels. transformers >= 5.25 kernelizes by default when the ``kernels`` package is installed: layers
#: are swapped for kernels fetched from the Hub (a hidden download, other numerics than the model we compare
#: against), and loading on the meta device fails outright ("Unsupported device type 'meta'").
LOAD_KWARGS: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False, "use_kernels": False}

__all__ = ["VerificationError", "verify_saved_model", "verify_saved_tokenizer", "auto_class_for", "sample_input_ids",
           "compare_outputs"]

#: Auto classes tried, most specific first, to find the one that rebuilds ``type(model)``
_AUTO_NAMES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
               "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModel")


class VerificationError(ValueError):
    """The saved folder does not reload into the in-memory model (missing/unexpected keys or other outputs)."""


def auto_class_for(model: nn.Module) -> Any:
    """The transformers Auto class whose mapping builds ``type(model)`` from ``type(model.config)``."""
    import transformers

    for name in _AUTO_NAMES:
        auto = getattr(transformers, name)
        try:
            if auto._model_mapping.get(type(model.config), None) is type(model):
                return auto
        except KeyError:  # lazy mappings raise for config classes they do not know
            continue
    raise VerificationError(f"no transformers Auto class rebuilds {type(model).__name__} from "
                            f"{type(model.config).__name__}; cannot verify the save")


def sample_input_ids(model: nn.Module, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    """A short fixed batch of token ids valid for ``model`` (within its vocabulary and positions)."""
    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 2
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or length
    length = max(2, min(length, int(max_pos) - 2))
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device))
    tensor = getattr(out, "logits", None)
    if tensor is None:
        tensor = getattr(out, "last_hidden_state", None)
    if tensor is None:
        tensor = out[0]
    return tensor.detach().float().cpu()


def compare_outputs(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest |difference| relative to the largest |expected| value; raises if above the dtype's tolerance.

    Same dtype, device and attention implementation normally reproduce outputs bit for bit; the tolerance only
    absorbs non-deterministic kernels. A wrong or re-initialised tensor changes outputs by O(1) relative.
    """
    if expected.shape != got.shape:
        raise VerificationError(f"reloaded model gives outputs of shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if not torch.isfinite(got).all() and torch.isfinite(expected).all():
        raise VerificationError("reloaded model gives non-finite outputs")
    scale = expected.abs().max().clamp_min(1e-12)
    rel = float((expected - got).abs().max() / scale)
    tol = 1e-4 if dtype == torch.float32 or dtype == torch.float64 else 2e-2
    if rel > tol:
        raise VerificationError(f"reloaded model's outputs differ from the in-memory model's by {rel:.3g} "
                                f"(relative; tolerance {tol:g})")
    return rel


def _check_loading_info(info: dict[str, Any], folder: Path) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    if info.get("error_msgs"):
        problems.append("; ".join(map(str, info["error_msgs"]))[:500])
    if problems:
        raise VerificationError(f"saved model in {folder} does not reload completely ({'; '.join(problems)})")


def _check_parameters(model: nn.Module, reloaded: nn.Module) -> None:
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    got = {n: tuple(p.shape) for n, p in reloaded.named_parameters()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = sorted(n for n in set(want) & set(got) if want[n] != got[n])
        raise VerificationError(
            "reloaded model's parameters differ from the in-memory model's "
            f"(missing {missing[:3]}, extra {extra[:3]}, other shapes {[(n, want[n], got[n]) for n in shapes[:3]]})")


@torch.no_grad()
def verify_saved_model(
    model: nn.Module,
    folder: str | os.PathLike,
    full: bool = True,
    loader: Callable[[str], nn.Module] | None = None,
) -> float | None:
    """Check that ``folder`` reloads into ``model``; raises :class:`VerificationError` if not.

    Args:
        full: also load the weights and compare outputs on :func:`sample_input_ids` (needs memory for a
            second copy of the model); ``False`` checks keys and shapes on the meta device only.
        loader: ``path -> model`` for formats ``from_pretrained`` does not read (e.g. the kernel-backed
            compressed format); it is used for the full check, and the meta-device check is skipped.

    Returns the relative output difference of the full check (``None`` when ``full=False``).
    """
    folder = Path(folder)
    params = next(model.parameters())
    if loader is None:
        auto = auto_class_for(model)
        kwargs: dict[str, Any] = {**LOAD_KWARGS, "output_loading_info": True}
        attn = getattr(model.config, "_attn_implementation", None)
        if attn:
            kwargs["attn_implementation"] = attn
        skeleton, info = auto.from_pretrained(str(folder), device_map="meta", **kwargs)
        _check_loading_info(info, folder)
        _check_parameters(model, skeleton)
        del skeleton
        if not full:
            return None
        reloaded, info = auto.from_pretrained(str(folder), dtype=params.dtype, **kwargs)
        _check_loading_info(info, folder)
    else:
        if not full:
            return None
        reloaded = loader(str(folder))
    reloaded.to(params.device).eval()
    _check_parameters(model, reloaded)
    was_training = model.training
    model.eval()
    try:
        ids = sample_input_ids(model)
        return compare_outputs(_outputs(model, ids), _outputs(reloaded, ids), params.dtype)
    finally:
        model.train(was_training)
        del reloaded


def verify_saved_tokenizer(model: nn.Module, tokenizer: Any, folder: str | os.PathLike,
                           texts: tuple[str, ...] | None = None) -> None:
    """Check a rewritten (vocabulary-pruned) tokenizer saved in ``folder``: it fits ``model``'s embedding, reloads with
    ``AutoTokenizer`` (no remote code) and gives the in-memory tokenizer's ids on ``texts`` (default: several
    scripts, code and emoji); raises :class:`VerificationError` if not.

    Example::

        tokenizer.save_pretrained(tmp)
        verify_saved_tokenizer(model, tokenizer, tmp)
    """
    from transformers import AutoTokenizer

    from .tokenizer_prune import ROUND_TRIP_TEXTS

    rows = int(model.get_input_embeddings().weight.shape[0])
    if len(tokenizer) > rows:
        raise VerificationError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {rows}: save "
                                "the tokenizer that belongs to the pruned model (the prune result's tokenizer)")
    reloaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    for text in texts or ROUND_TRIP_TEXTS:
        want, got = tokenizer(text)["input_ids"], reloaded(text)["input_ids"]
        if list(want) != list(got):
            raise VerificationError(f"the saved tokenizer in {folder} reloads with other token ids than the "
                                    "in-memory one")
        if got and max(got) >= rows:
            raise VerificationError(f"the saved tokenizer emits token id {max(got)}, outside the model's {rows} rows")
