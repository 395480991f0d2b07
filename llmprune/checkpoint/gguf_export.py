"""Export a saved Llama-family model (dense, uniform or per-layer pruned) as a GGUF file for llama.cpp and Ollama.

Which llama.cpp architecture takes the file (checked in the llama.cpp that llama-cpp-python 0.3.36 vendors):

- ``llama``: one width for every layer. Its tensors are built from layer 0's ``head_count``, ``head_count_kv`` and
  ``feed_forward_length`` (``LLAMA_LOAD_LOCALS``), with an explicit ``attention.key_length`` / ``value_length``, so
  a head-pruned model whose ``hidden_size != heads * head_dim`` runs as it is.
- ``deci`` (built for Llama-3.1-Nemotron-51B): per-layer arrays ``head_count``, ``head_count_kv`` and
  ``feed_forward_length``; tensors and graph use ``n_head(il)``, ``n_head_kv(il)``, ``n_ff(il)`` with one head
  size. (Its graph gives ``n_head == 0`` and ``n_ff == 0`` other meanings, attention-free and FFN-free layers, the
  latter dropping the attention output too; llmprune keeps at least one head and one neuron per layer, and a
  layer without them is refused here.)

Both run RoPE on adjacent pairs (``LLAMA_ROPE_TYPE_NORM``) where transformers rotates the two halves of each head,
so the q/k rows (and biases) of every head are interleaved here: per head, ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]``
becomes ``[x_0, y_0, x_1, y_1, ...]``. The permutation is per head of ``head_dim`` rows, so pruned head counts
need nothing else.

The tokenizer goes in as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary with its pre-tokenizer name, special
tokens, BOS/EOS behaviour and chat template, so ``llama-cli``, ``llama-server`` and Ollama run the file as it is.

Every export is checked before it is reported written (:func:`export_gguf`): the file is written next to its
destination under a temporary name, loaded by llama.cpp in a child process (a file llama.cpp rejects may abort
the process), its logits on a fixed text are compared with transformers' and its tokenizer with the model's own,
and only then renamed into place. Any failure removes the temporary file.

Example::

    from llmprune.checkpoint.gguf_export import export_gguf
    report = export_gguf("runs/pruned", "runs/pruned.gguf", outtype="q8_0")
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, GGUFExportError, OutputExistsError
from .gguf_tokenizer import add_tokenizer, check_tokenizer
from .verify import VerificationError

__all__ = ["OUTTYPES", "GGUFExportError", "GGUFLayout", "ExportReport", "plan_layout", "write_gguf", "export_gguf",
           "SUPPORTED_MODEL_TYPES", "LOGIT_TOLERANCE", "refuse_unsupported", "compare_logits"]

#: written here in numpy (gguf-py), and (q4_k_m, q5_k_m) quantized from an f16 file by llama.cpp's own quantizer
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m")
_WRITTEN_HERE = ("f32", "f16", "bf16", "q8_0")
#: model types written here (per-layer checkpoints carry ``llmprune_<type>``); Mistral is Llama without biases
#: (llmprune saves a head-pruned Llama as an exact Mistral), Qwen2 is Llama with q/k/v biases, which both llama.cpp
#: graphs take as optional tensors (so Qwen2 goes to ``llama`` / ``deci`` too, not to llama.cpp's ``qwen2``)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: largest |logit difference| relative to the largest |logit| that a verified export may show, by outtype
#: (f32 differs only in summation order; the others round every weight; f16 KV cache in the check is avoided)
LOGIT_TOLERANCE = {"f32": 2e-3, "f16": 2e-2, "bf16": 6e-2, "q8_0": 6e-2, "q5_k_m": 0.15, "q4_k_m": 0.25}
#: fraction of positions whose top-1 token must agree between transformers and llama.cpp, by outtype
TOP1_AGREEMENT = {"f32": 0.99, "f16": 0.95, "bf16": 0.85, "q8_0": 0.85, "q5_k_m": 0.7, "q4_k_m": 0.6}
_PER_LAYER_PREFIX = "llmprune_"  # as llmprune.arch.PER_LAYER_PREFIX (checkpoint may not import arch)
_Q8_BLOCK = 32
#: a fixed text with digits, punctuation, several scripts and newlines, for the logit and tokenizer checks
CHECK_TEXT = ("The capital of France is Paris. In 1889, 7,300 tonnes of iron went into the Eiffel Tower!\n"
              "def f(x):\n    return x ** 2  # squares\nCafé, naïve, 東京, Ελλάδα, don't, we'll, I'm.")


@dataclass
class GGUFLayout:
    """What goes into the file: the llama.cpp architecture and the per-layer widths it is given."""

    architecture: str  # "llama" (one width everywhere) or "deci" (per-layer widths)
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    head_dim: int


@dataclass
class ExportReport:
    path: Path
    architecture: str
    outtype: str
    size_bytes: int
    verified: bool
    max_rel_logit_diff: float | None = None
    top1_agreement: float | None = None
    fallback_tensors: list[str] = field(default_factory=list)  # tensors kept f16 (rows not a multiple of 32)
    layout: GGUFLayout | None = None

    def summary(self) -> str:
        check = (f"llama.cpp logits within {self.max_rel_logit_diff:.2g} (relative) of transformers', top-1 agreement "
                 f"{self.top1_agreement:.0%}" if self.verified and self.max_rel_logit_diff is not None
                 else "not checked in llama.cpp (--no-verify)")
        kept = (f"; {len(self.fallback_tensors)} matrices kept f16 (rows not whole q8_0 blocks: prune with "
                "--multiple-of 32 to quantize them all)" if self.fallback_tensors else "")
        return (f"wrote {self.path} ({self.size_bytes / 2**20:.1f} MiB, {self.outtype}, llama.cpp architecture "
                f"{self.architecture!r}); {check}{kept}")


def _base_type(config: Any) -> str:
    t = str(getattr(config, "model_type", ""))
    return t[len(_PER_LAYER_PREFIX):] if t.startswith(_PER_LAYER_PREFIX) else t


def _decoder(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def refuse_unsupported(config: Any) -> None:
    """One line for every family or setting llama.cpp's llama/deci graphs do not compute the same way (from the
    config alone, so ``export`` and ``prune --export`` fail before any work)."""
    model_type = _base_type(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GGUFExportError(
            f"GGUF export covers the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}, dense, uniform or per-layer "
            f"pruned); {model_type!r} is not supported yet: export the pruned safetensors folder with llama.cpp's "
            "convert_hf_to_gguf.py when its widths are uniform (--allocation uniform), or use it in transformers")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise GGUFExportError(f"GGUF export: llama.cpp's llama graph uses SiLU; this model's hidden_act is {act!r}")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise GGUFExportError(f"GGUF export: RoPE type {rope_type!r} is not exported (default, linear and llama3 are)")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise GGUFExportError("GGUF export: pretraining_tp > 1 is not supported")


def context_length(config: Any) -> int:
    """The context written to the file: the model's, cut to its sliding window (Mistral v0.1: 4096 of 32768), which
    llama.cpp's llama/deci graphs do not have; within it, full attention is the same computation."""
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 2048)
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):  # Qwen2 carries a window it does not use
        window = None
    return min(max_pos, int(window)) if window else max_pos


def _widths(model: nn.Module) -> tuple[list[tuple[int, int, int]], int]:
    """(heads, kv_heads, neurons) of every decoder layer, read from the tensors, and the head size."""
    layers = _decoder(model).layers
    head_dims = set()
    out = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = int(attn.head_dim)
        head_dims.add(hd)
        q, kv = attn.q_proj.out_features, attn.k_proj.out_features
        if q % hd or kv % hd or attn.v_proj.out_features != kv:
            raise GGUFExportError(f"GGUF export: q/k/v widths {q}/{kv}/{attn.v_proj.out_features} are not whole "
                                  f"heads of {hd}")
        out.append((q // hd, kv // hd, mlp.down_proj.in_features))
    if len(head_dims) != 1:
        raise GGUFExportError(f"GGUF export: llama.cpp takes one head size for every layer, found {sorted(head_dims)}")
    return out, head_dims.pop()


def plan_layout(model: nn.Module) -> GGUFLayout:
    """Choose the llama.cpp architecture and the widths it is given, or raise :class:`GGUFExportError`."""
    refuse_unsupported(model.config)
    widths, hd = _widths(model)
    if hd % 2:
        raise GGUFExportError(f"GGUF export: RoPE needs an even head size, found {hd}")
    for i, (h, kv, _) in enumerate(widths):
        if (kv == 0) != (h == 0) or (kv and h % kv):
            raise GGUFExportError(f"GGUF export: layer {i} has {h} query heads for {kv} KV heads; llama.cpp needs "
                                  "whole groups")
    for i, (h, _, ff) in enumerate(widths):
        if not h or not ff:  # llmprune keeps at least one head and one neuron; transformers cannot run fewer
            raise GGUFExportError(f"GGUF export: layer {i} has {h} heads and {ff} FFN neurons; every layer needs both")
    n = len(widths)
    if len(set(widths)) == 1:
        h, kv, ff = widths[0]
        return GGUFLayout("llama", [h] * n, [kv] * n, [ff] * n, hd)
    return GGUFLayout("deci", [w[0] for w in widths], [w[1] for w in widths], [w[2] for w in widths], hd)


# ---------------------------------------------------------------------------------------------------- tensors


def _interleave_rope(w: np.ndarray, head_dim: int) -> np.ndarray:
    """transformers' per-head [first half, second half] rows -> llama.cpp's adjacent pairs (rows or a bias)."""
    rest = w.shape[1:]
    return np.ascontiguousarray(w.reshape(-1, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape))


def _rope_freq_factors(model: nn.Module, head_dim: int, theta: float) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` (it divides each frequency by its factor) from the model's own ``inv_freq``:
    ``None`` when the frequencies are the default ones (llama3 and linear scaling give factors)."""
    rotary = getattr(_decoder(model), "rotary_emb", None)
    inv = getattr(rotary, "inv_freq", None)
    if inv is None:
        return None
    if abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise GGUFExportError("GGUF export: RoPE with attention scaling (YaRN/LongRoPE) is not exported")
    default = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = (default / inv.detach().double().cpu()).numpy()
    if np.allclose(factors, 1.0, rtol=1e-6, atol=0):
        return None
    return factors.astype(np.float32)


def _tensor_type(name: str, array: np.ndarray, outtype: str) -> str:
    """The GGML type of one tensor: 1-D tensors (norms, biases, rope factors) stay f32, as llama.cpp's converter
    keeps them; a q8_0 matrix whose rows are not whole 32-value blocks falls back to f16."""
    if array.ndim == 1 or outtype == "f32":
        return "f32"
    if outtype == "q8_0" and array.shape[-1] % _Q8_BLOCK:
        return "f16"
    return outtype


def _add_array(writer: Any, name: str, array: np.ndarray, kind: str) -> None:
    import gguf

    if kind == "f32":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    elif kind == "f16":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
    else:
        qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
        data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def _layer_tensors(layer: nn.Module, index: int, head_dim: int) -> list[tuple[str, np.ndarray]]:
    """The GGUF tensors of one decoder layer (q/k rows and biases in llama.cpp's RoPE order)."""
    attn, mlp = layer.self_attn, layer.mlp

    def arr(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().float().cpu().numpy()

    p = f"blk.{index}."
    out: list[tuple[str, np.ndarray]] = [
        (p + "attn_norm.weight", arr(layer.input_layernorm.weight)),
        (p + "attn_q.weight", _interleave_rope(arr(attn.q_proj.weight), head_dim)),
        (p + "attn_k.weight", _interleave_rope(arr(attn.k_proj.weight), head_dim)),
        (p + "attn_v.weight", arr(attn.v_proj.weight)),
        (p + "attn_output.weight", arr(attn.o_proj.weight)),
        (p + "ffn_norm.weight", arr(layer.post_attention_layernorm.weight)),
        (p + "ffn_gate.weight", arr(mlp.gate_proj.weight)),
        (p + "ffn_up.weight", arr(mlp.up_proj.weight)),
        (p + "ffn_down.weight", arr(mlp.down_proj.weight)),
    ]
    for name, module, rope in (("attn_q", attn.q_proj, True), ("attn_k", attn.k_proj, True),
                               ("attn_v", attn.v_proj, False), ("attn_output", attn.o_proj, False),
                               ("ffn_gate", mlp.gate_proj, False), ("ffn_up", mlp.up_proj, False),
                               ("ffn_down", mlp.down_proj, False)):
        bias = arr(getattr(module, "bias", None))
        if bias is not None:  # Llama's attention_bias / mlp_bias: optional tensors of both graphs
            out.append((p + name + ".bias", _interleave_rope(bias, head_dim) if rope else bias))
    return out


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType


def write_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, outtype: str = "f16",
               name: str | None = None, layout: GGUFLayout | None = None) -> tuple[GGUFLayout, list[str], dict[str, Any]]:
    """Write ``model`` and ``tokenizer`` to ``path`` (no check; :func:`export_gguf` checks and renames).

    Returns the layout, the tensors that fell back to f16 under q8_0, and what the tokenizer check needs.
    """
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install 'llmprune[llamacpp]'") from None

    if outtype not in _WRITTEN_HERE:
        raise GGUFExportError(f"GGUF export: write_gguf writes {', '.join(_WRITTEN_HERE)}, not {outtype!r} "
                              "(export_gguf makes the llama.cpp-quantized types)")
    layout = layout or plan_layout(model)
    config = model.config
    decoder = _decoder(model)
    embed = decoder.embed_tokens.weight
    head = model.get_output_embeddings()
    hidden, vocab = int(embed.shape[1]), int(embed.shape[0])
    arch = layout.architecture
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or "pruned model")
    writer.add_string("general.quantized_by", "llmprune")
    writer.add_file_type(_FILE_TYPES[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(layout.heads))
    uniform = arch == "llama"
    writer.add_feed_forward_length(layout.ffn[0] if uniform else layout.ffn)
    writer.add_head_count(layout.heads[0] if uniform else layout.heads)
    writer.add_head_count_kv(layout.kv_heads[0] if uniform else layout.kv_heads)
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab)
    check = add_tokenizer(writer, tokenizer, vocab)

    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", embed.detach().float().cpu().numpy())]
    factors = _rope_freq_factors(model, layout.head_dim, theta)
    if factors is not None:
        tensors.append(("rope_freqs.weight", factors))
    layers = decoder.layers
    for i, layer in enumerate(layers):
        tensors += _layer_tensors(layer, i, layout.head_dim)
    tensors.append(("output_norm.weight", decoder.norm.weight.detach().float().cpu().numpy()))
    tied = head is None or head.weight is embed or (head.weight.shape == embed.shape and torch.equal(head.weight, embed))
    if not tied:
        tensors.append(("output.weight", head.weight.detach().float().cpu().numpy()))
    fallback = []
    for tname, array in tensors:
        kind = _tensor_type(tname, array, outtype)
        if outtype == "q8_0" and kind == "f16":
            fallback.append(tname)
        _add_array(writer, tname, array, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return layout, fallback, check


# ---------------------------------------------------------------------------------------------------- check


def _check_ids(tokenizer: Any, model: nn.Module, length: int = 48) -> list[int]:
    ids = list(tokenizer(CHECK_TEXT)["input_ids"])
    return ids[: max(2, min(length, context_length(model.config)))]


@torch.no_grad()
def _reference_logits(model: nn.Module, ids: list[int]) -> np.ndarray:
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    return out.float().cpu().numpy()


def compare_logits(expected: np.ndarray, got: np.ndarray, outtype: str) -> tuple[float, float]:
    """(max |difference| / max |expected|, top-1 agreement); raises :class:`VerificationError` outside the
    outtype's tolerance."""
    if expected.shape != got.shape:
        raise VerificationError(f"llama.cpp gives logits of shape {got.shape}, transformers {expected.shape}")
    if not np.isfinite(got).all():
        raise VerificationError("llama.cpp gives non-finite logits for the exported file")
    rel = float(np.abs(expected - got).max() / max(float(np.abs(expected).max()), 1e-12))
    top1 = float((expected.argmax(-1) == got.argmax(-1)).mean())
    if rel > LOGIT_TOLERANCE[outtype] or top1 < TOP1_AGREEMENT[outtype]:
        raise VerificationError(
            f"the exported file's logits in llama.cpp differ from transformers': {rel:.3g} relative (tolerance "
            f"{LOGIT_TOLERANCE[outtype]:g} for {outtype}), top-1 agreement {top1:.0%} (needs {TOP1_AGREEMENT[outtype]:.0%})")
    return rel, top1


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", verify: bool = True,
                overwrite: bool = False, name: str | None = None, threads: int | None = None) -> ExportReport:
    """Export the saved model ``folder`` to the GGUF file ``out``, checked in llama.cpp before it is renamed.

    Raises :class:`GGUFExportError` (one line) for what llama.cpp cannot run, :class:`VerificationError` when
    llama.cpp loads the file but computes something else, :class:`OutputExistsError` for an existing ``out``
    without ``overwrite``. Nothing is left at ``out`` (or beside it) on failure.
    """
    from .io import load_model
    from .llamacpp import LLAMACPP_QUANT_TYPES, LlamaCppError, llamacpp_available, quantize_gguf, run_gguf

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"GGUF export: --outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    out = Path(out).absolute()
    if out.suffix.lower() != ".gguf":
        raise GGUFExportError(f"GGUF export: the output file must end in .gguf ({out.name})")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output file {out} already exists; pass --overwrite to replace it")
    if outtype in LLAMACPP_QUANT_TYPES and not llamacpp_available():
        raise GGUFExportError(f"GGUF export: --outtype {outtype} runs llama.cpp's quantizer, which needs "
                              "llama-cpp-python: pip install 'llmprune[llamacpp]'")
    if verify and not llamacpp_available():
        raise GGUFExportError("GGUF export checks every file in llama.cpp, which needs llama-cpp-python: "
                              "pip install 'llmprune[llamacpp]' (or pass --no-verify to skip the check)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: not a model folder ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    refuse_unsupported(config)
    model, tokenizer = load_model(folder, dtype=torch.float32)
    if tokenizer is None:
        raise GGUFExportError(f"GGUF export: {folder} has no tokenizer; the GGUF file must carry one")
    model.eval()
    layout = plan_layout(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    base = tmp.with_name(tmp.name[:-len(".gguf")] + "-f16.gguf")  # llama.cpp quantizes from this one
    try:
        quantized = outtype in LLAMACPP_QUANT_TYPES
        layout, fallback, tok_info = write_gguf(model, tokenizer, base if quantized else tmp,
                                                outtype="f16" if quantized else outtype,
                                                name=name or Path(folder).name, layout=layout)
        if quantized:
            try:
                quantize_gguf(base, tmp, outtype, threads=threads)
            except LlamaCppError as exc:
                raise GGUFExportError(f"GGUF export: {exc}") from None
            base.unlink()
        report = ExportReport(out, layout.architecture, outtype, tmp.stat().st_size, verify, layout=layout,
                              fallback_tensors=fallback)
        if verify:
            ids = _check_ids(tokenizer, model, length=48)
            texts = [CHECK_TEXT] + [s for s in tok_info["special"][:4]]
            try:
                result = run_gguf(tmp, ids, texts, threads=threads)
            except LlamaCppError as exc:
                raise VerificationError(f"llama.cpp cannot run the exported file: {exc}") from None
            report.max_rel_logit_diff, report.top1_agreement = compare_logits(
                _reference_logits(model, ids), result["logits"], outtype)
            check_tokenizer(tokenizer, result["tokens"], texts)
        umask = os.umask(0)  # mkstemp makes the file 0600; a finished export gets the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
        return report
    finally:
        for leftover in (tmp, base):
            if leftover.exists():
                leftover.unlink()
