"""GGUF as an input format (issue 23): ``load_model`` and every CLI ``MODEL`` read a ``.gguf`` file or a folder
holding exactly one, dequantised to float32; outputs are plain safetensors without ``quantization_config``.

The GGUF files are written here with ``gguf.GGUFWriter`` from a tiny random Llama (f32 tensors, so the round trip
is exact) with a tiny byte-level (``gpt2``) tokenizer. Llama's q/k rows are stored in llama.cpp's rotary order
(``permute`` below, the inverse of transformers' ``_reverse_permute_weights``).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llmprune.cli import main
from llmprune.checkpoint.io import CheckpointError, load_model, save_pruned

from tiny_models import tiny_causal_lm

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
np = pytest.importorskip("numpy")

_PER_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def byte_tokenizer() -> tuple[list[str], list[str], list[int]]:
    """Tokens (the 256 byte-level symbols, three merges, one control token), merges and token types."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    return tokens, ["Ġ t", "h e", "Ġt he"], [1] * (len(tokens) - 1) + [3]  # 1 normal, 3 control


VOCAB = len(byte_tokenizer()[0])


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path, arch: str = "llama", tokenizer: bool = True) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_embedding_length(c.hidden_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if tokenizer:
        tokens, merges, types = byte_tokenizer()
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(len(tokens) - 1)
        w.add_eos_token_id(len(tokens) - 1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in _PER_LAYER.items()})
    state = model.state_dict()
    for hf, name in names.items():
        t = state[hf].detach().float().numpy()
        if name.endswith("attn_q.weight"):
            t = permute(t, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = permute(t, c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_gguf(request, tmp_path_factory):
    """(source model, path of its GGUF file in a folder of its own)."""
    model = tiny_causal_lm("llama", vocab_size=VOCAB, tie_word_embeddings=request.param == "tied")
    folder = tmp_path_factory.mktemp(f"gguf-{request.param}")
    write_llama_gguf(model, folder / "tiny.gguf")
    return model, folder / "tiny.gguf"


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _no_quantization(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert not list(folder.glob("*.gguf"))
    return config


def test_tiny_gguf_loads_exactly(tiny_gguf):
    source, path = tiny_gguf
    for where in (path, path.parent):  # the file, or the folder holding it
        model, tok = load_model(where)
        assert type(model) is type(source) and model.dtype == torch.float32
        assert not hasattr(model.config, "quantization_config") and not getattr(model, "is_quantized", False)
        assert model.config.tie_word_embeddings == source.config.tie_word_embeddings
        state = model.state_dict()
        for name, tensor in source.state_dict().items():
            assert torch.equal(state[name], tensor), name
        model.set_attn_implementation("eager")
        with torch.no_grad():
            torch.testing.assert_close(model(_ids()).logits, source(_ids()).logits, atol=0, rtol=0)
        ids = tok("hello the world").input_ids
        assert ids[:1] == [257] and 258 in ids  # "he" and " the" merged: the file's merges are used
        assert tok.eos_token == "<|endoftext|>"


def test_pruned_gguf_saves_plain_safetensors(tiny_gguf, tmp_path):
    from llmprune import PruneConfig, prune

    _, path = tiny_gguf
    model, tok = load_model(path)
    result = prune(model, PruneConfig(heads=0.5, ffn=0.25, method="magnitude"), progress=False)
    out = result.save(tmp_path / "out", tokenizer=tok, source=str(path))
    _no_quantization(out)
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    reloaded, _ = load_model(out)
    model.set_attn_implementation("eager")
    reloaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids(1)).logits, model(_ids(1)).logits, atol=0, rtol=0)


def test_cli_prune_and_sparsify_read_gguf(tiny_gguf, tmp_path, capsys):
    _, path = tiny_gguf
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--ffn", "0.25", "--heads", "0.5", "--method", "magnitude", "--out", str(out),
                 "--quiet"]) == 0
    config = _no_quantization(out)
    assert config["intermediate_size"] == 72
    assert "attention heads" in capsys.readouterr().out
    sparse = tmp_path / "sparse"
    assert main(["sparsify", str(path.parent), "--method", "magnitude", "--sparsity", "0.5", "--out", str(sparse),
                 "--quiet"]) == 0
    _no_quantization(sparse)


def test_eval_loader_reads_gguf(tiny_gguf):
    from llmprune.eval.cli import load_model as eval_load

    model, tok = eval_load(str(tiny_gguf[1]), device="cpu")
    assert tok is not None and not hasattr(model.config, "quantization_config")


def test_streaming_refuses_gguf(tiny_gguf, tmp_path, capsys):
    from llmprune import PruneConfig
    from llmprune.streaming import prune_streaming

    _, path = tiny_gguf
    out = tmp_path / "streamed"
    assert main(["prune", str(path), "--ffn", "0.25", "--method", "magnitude", "--streaming", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not GGUF" in err and "convert it first" in err
    assert not out.exists() and not list(tmp_path.glob(".streamed*"))
    with pytest.raises(CheckpointError, match="convert it first"):
        prune_streaming(path.parent, PruneConfig(ffn=0.25, method="magnitude"), out)


def test_folder_with_two_gguf_files_is_refused(tiny_gguf, tmp_path):
    data = tiny_gguf[1].read_bytes()
    (tmp_path / "a.gguf").write_bytes(data)
    (tmp_path / "b.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match="holds 2 .gguf files.*a.gguf, b.gguf"):
        load_model(tmp_path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(bad)


def test_truncated_gguf(tiny_gguf, tmp_path):
    short = tmp_path / "short.gguf"
    short.write_bytes(tiny_gguf[1].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF"):
        load_model(short, with_tokenizer=False)


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    path = tmp_path / "foo.gguf"
    w = gguf.GGUFWriter(str(path), "foo")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'foo'") as err:
        load_model(path, with_tokenizer=False)
    assert "\n" not in str(err.value)
    assert main(["prune", str(path), "--ffn", "0.25", "--method", "magnitude", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "'foo'" in line and not (tmp_path / "o").exists()


def test_missing_gguf_package(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(CheckpointError, match="needs the gguf package: pip install gguf"):
        load_model(tiny_gguf[1])


def test_saved_pruned_model_from_gguf_has_no_quantizer(tiny_gguf, tmp_path):
    """save_pruned directly (sparsify / recover / train all save through it)."""
    model, tok = load_model(tiny_gguf[1])
    out = save_pruned(model, tmp_path / "plain", tokenizer=tok)
    _no_quantization(out)
