"""GGUF export for llama.cpp / Ollama (issue 39): ``llmprune export FOLDER --format gguf --out FILE``.

Tiny random Llama models (with the reference model's real byte-level BPE tokenizer) are pruned in every shape the
exporter takes (dense, uniform, per-layer, hidden-pruned; tied and untied heads; GQA and MQA; llama3 RoPE), saved
with ``save_pruned`` and exported. The tests marked ``llamacpp`` load the files in real llama.cpp (llama-cpp-python,
``pip install -e '.[llamacpp]'``) and compare its logits with transformers' on tokens the export's own check did not
use; without llama-cpp-python they skip. The others need only the ``gguf`` package: the uniform files are read
back by transformers' own GGUF loader (an independent reader of llama.cpp's q/k layout), the per-layer ones by
``gguf.GGUFReader``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmprune.arch import get_adapter
from llmprune.checkpoint.errors import OutputExistsError
from llmprune.checkpoint.gguf_export import LOGIT_TOLERANCE, GGUFExportError, compare_logits, export_gguf, write_gguf
from llmprune.checkpoint.io import save_pruned
from llmprune.checkpoint.llamacpp import llamacpp_available, run_gguf
from llmprune.checkpoint.verify import VerificationError
from llmprune.cli import main
from llmprune.core.config import LayerPlan
from llmprune.structured.hidden import prune_hidden
from llmprune.checkpoint.perlayer import set_config_widths
from llmprune.arch.surgery import prune_layer, remove_layers

from conftest import REF_MODEL
from tiny_models import tiny_causal_lm

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
np = pytest.importorskip("numpy")

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(),
                                    reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
VOCAB = 8192  # the reference tokenizer's

#: per-layer plans on the tiny Llama (4 query heads in 2 KV groups of 2, head_dim 16, 96 FFN neurons, 3 layers)
PER_LAYER = [None, LayerPlan(kept_heads=[0, 2], kept_kv_heads=[0, 1], kept_neurons=list(range(0, 96, 2))),
             LayerPlan(kept_heads=[2, 3], kept_kv_heads=[1], kept_neurons=list(range(33)))]
UNIFORM = [LayerPlan(kept_heads=[0, 1], kept_kv_heads=[0], kept_neurons=list(range(10, 74)))] * 3
#: MQA (4 query heads, 1 KV head): per-layer query-head counts 4, 3, 1
MQA_PER_LAYER = [None, LayerPlan(kept_heads=[0, 1, 3], kept_kv_heads=[0], kept_neurons=list(range(40))),
                 LayerPlan(kept_heads=[2], kept_kv_heads=[0], kept_neurons=list(range(70)))]


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REF_MODEL)


def pruned_folder(root: Path, name: str, plans=None, tied: bool = True, hidden_keep=None, removed=None,
                  **config) -> Path:
    """A tiny Llama pruned by ``plans`` (one LayerPlan or None per layer), ``hidden_keep`` and ``removed`` (decoder
    layers), saved by save_pruned."""
    if not REF_MODEL.is_dir():
        pytest.skip(f"reference model not found at {REF_MODEL}")
    model = tiny_causal_lm("llama", vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, tie_word_embeddings=tied,
                           **config)
    with torch.no_grad():  # peakier logits and sharper attention than the 0.02 init: with near-uniform attention
        model.get_output_embeddings().weight.mul_(8.0)  # RoPE (and a wrong q/k row order) would hardly show
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    adapter = get_adapter(model)
    for layer, plan in zip(adapter.decoder_layers(model), plans or []):
        if plan is not None:
            prune_layer(adapter, layer, plan)
    if hidden_keep is not None:
        prune_hidden(model, adapter, hidden_keep)
    if removed:
        remove_layers(model, adapter, removed)
    set_config_widths(model, adapter)
    folder = root / name
    save_pruned(model, folder, tokenizer=_tokenizer())
    return folder


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _fresh_ids(n: int = 40, seed: int = 1) -> list[int]:
    """Tokens the export's own check did not see (it uses a fixed text): BOS then random ids."""
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()


def _metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, f in reader.fields.items():
        if not f.types:
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] != gguf.GGUFValueType.STRING:
            out[key] = [int(f.parts[i][0]) for i in f.data]
        elif f.types[0] == gguf.GGUFValueType.STRING:
            out[key] = bytes(f.parts[f.data[0]]).decode()
        elif f.types[0] != gguf.GGUFValueType.ARRAY:
            out[key] = f.parts[f.data[0]][0].item()
    out["tensors"] = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    return out


# ------------------------------------------------------------------------------------------- no llama.cpp needed


def test_uniform_file_reads_back_in_transformers(tmp_path):
    """Dense and uniform head/FFN-pruned (saved as an exact Mistral) files are plain ``llama`` GGUFs that
    transformers' own GGUF reader turns back into the same logits (f32: exact up to float order)."""
    from transformers import AutoModelForCausalLM

    from llmprune.checkpoint.io import load_model

    for name, plans, tied in (("dense", None, True), ("uniform", UNIFORM, False)):
        folder = pruned_folder(tmp_path, name, plans, tied=tied)
        model, tok = load_model(folder, dtype=torch.float32)
        layout, fallback, _ = write_gguf(model, tok, tmp_path / f"{name}.gguf", outtype="f32")
        assert layout.architecture == "llama" and not fallback
        meta = _metadata(tmp_path / f"{name}.gguf")
        assert meta["general.architecture"] == "llama"
        assert ("output.weight" in meta["tensors"]) == (not tied)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{name}.gguf", dtype=torch.float32).eval()
        ids = torch.tensor([_fresh_ids()])
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_per_layer_goes_to_deci_with_width_arrays(tmp_path):
    folder = pruned_folder(tmp_path, "perlayer", PER_LAYER)
    from llmprune.checkpoint.io import load_model

    model, tok = load_model(folder, dtype=torch.float32)
    assert str(model.config.model_type).startswith("llmprune_")
    layout, fallback, _ = write_gguf(model, tok, tmp_path / "p.gguf", outtype="q8_0")
    assert layout.architecture == "deci"
    meta = _metadata(tmp_path / "p.gguf")
    assert meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == [4, 2, 2]
    assert meta["deci.attention.head_count_kv"] == [2, 2, 1]
    assert meta["deci.feed_forward_length"] == [96, 48, 33]
    assert meta["deci.attention.key_length"] == 16 and meta["deci.rope.dimension_count"] == 16
    assert meta["tensors"]["blk.2.attn_k.weight"] == (64, 16)  # GGUF shapes are (columns, rows)
    assert meta["tensors"]["blk.1.ffn_down.weight"] == (48, 64)
    # 48 and 33 columns are not whole 32-value q8_0 blocks: kept f16
    assert fallback == ["blk.1.ffn_down.weight", "blk.2.ffn_down.weight"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["tokenizer.ggml.eos_token_id"] == 1


@needs_llamacpp
def test_qwen2_uniform_and_per_layer(tmp_path):
    """Qwen2 is Llama with q/k/v biases: both llama.cpp graphs take them (permuted like the q/k rows)."""
    from llmprune.checkpoint.io import load_model

    for name, plans in (("dense", None), ("perlayer", PER_LAYER)):
        # +16: loaded for a qwen2 config, the reference tokenizer gains Qwen2's <|endoftext|> (id 8192)
        model = tiny_causal_lm("qwen2", vocab_size=VOCAB + 16, bos_token_id=0, eos_token_id=1)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(12.0)
                    proj.bias.normal_(0, 1.0)  # biases that matter
        adapter = get_adapter(model)
        for layer, plan in zip(adapter.decoder_layers(model), plans or []):
            if plan is not None:
                prune_layer(adapter, layer, plan)
        set_config_widths(model, adapter)
        folder = tmp_path / name
        save_pruned(model, folder, tokenizer=_tokenizer())
        out = tmp_path / f"{name}.gguf"
        report = export_gguf(folder, out, outtype="f32")
        assert report.architecture == ("llama" if plans is None else "deci")
        assert "blk.1.attn_q.bias" in _metadata(out)["tensors"]
        compare_logits(_hf_logits(folder, _fresh_ids()), run_gguf(out, _fresh_ids())["logits"], "f32")


def test_unsupported_family_is_one_line_and_writes_nothing(tmp_path, capsys):
    model = tiny_causal_lm("qwen3", vocab_size=VOCAB)
    folder = tmp_path / "qwen3"
    save_pruned(model, folder, tokenizer=_tokenizer())
    out = tmp_path / "q.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out), "--no-verify"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llmprune")]
    assert len(err) == 1 and "'qwen3' is not supported" in err[0] and "--allocation uniform" in err[0]
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".q.gguf*")) == []


@needs_llamacpp
def test_sliding_window_caps_the_context(tmp_path):
    """llama.cpp's llama graph has no sliding window: the file's context is the window (Mistral v0.1: 4096), within
    which full attention computes the same, and the check runs within it."""
    model = tiny_causal_lm("mistral", vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)  # window 8 of 64 positions
    folder = tmp_path / "m"
    save_pruned(model, folder, tokenizer=_tokenizer())
    report = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    assert report.verified and _metadata(tmp_path / "m.gguf")["llama.context_length"] == 8


def test_existing_output_and_missing_llamacpp(tmp_path, monkeypatch):
    folder = pruned_folder(tmp_path, "dense")
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        export_gguf(folder, out, verify=False)
    assert out.read_bytes() == b"keep"
    import llmprune.checkpoint.llamacpp as lc

    monkeypatch.setattr(lc, "llamacpp_available", lambda: False)
    with pytest.raises(GGUFExportError, match=r"llmprune\[llamacpp\].*--no-verify"):
        export_gguf(folder, tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()
    report = export_gguf(folder, tmp_path / "y.gguf", verify=False)
    assert not report.verified and (tmp_path / "y.gguf").stat().st_size == report.size_bytes


def test_compare_logits_tolerance():
    a = np.random.default_rng(0).normal(size=(8, 50)).astype(np.float32) * 5
    assert compare_logits(a, a + 1e-4, "f32")[1] == 1.0
    with pytest.raises(VerificationError, match="differ"):
        compare_logits(a, a + 0.5, "f16")


# ------------------------------------------------------------------------------------------- real llama.cpp

CASES = {
    # name: (plans, tied, config overrides, hidden kept[, removed layers])
    "dense-gqa-tied": (None, True, {}, None),
    "uniform-untied": (UNIFORM, False, {}, None),
    "perlayer-gqa-tied": (PER_LAYER, True, {}, None),
    "perlayer-gqa-untied": (PER_LAYER, False, {}, None),
    "perlayer-mqa": (MQA_PER_LAYER, True, {"num_key_value_heads": 1}, None),
    "uniform-mqa-untied": ([LayerPlan(kept_heads=[1, 2], kept_kv_heads=[0], kept_neurons=list(range(64)))] * 3,
                           False, {"num_key_value_heads": 1}, None),
    "perlayer-hidden": (PER_LAYER, False, {}, [c for c in range(64) if c % 4 != 1]),
    "perlayer-layer-removed": (PER_LAYER, True, {}, None, [0]),
    "llama3-rope": (None, True, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16}}, None),
}


@needs_llamacpp
@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_logits_match_transformers(tmp_path, case):
    plans, tied, config, hidden, *removed = CASES[case]
    folder = pruned_folder(tmp_path, case, plans, tied=tied, hidden_keep=hidden, removed=removed[0] if removed else None,
                           **config)
    ids = _fresh_ids()
    expected = _hf_logits(folder, ids)
    for outtype in ("f32", "q8_0") if case.startswith(("perlayer-gqa-tied", "dense")) else ("f32",):
        out = tmp_path / f"{case}-{outtype}.gguf"
        report = export_gguf(folder, out, outtype=outtype)
        assert report.verified and report.max_rel_logit_diff <= LOGIT_TOLERANCE[outtype]
        assert report.architecture == ("llama" if case.startswith(("dense", "uniform", "llama3")) else "deci")
        got = run_gguf(out, ids)["logits"]
        rel, top1 = compare_logits(expected, got, outtype)
        assert rel <= LOGIT_TOLERANCE[outtype] and top1 >= 0.85
    if hidden is not None:
        assert _metadata(out)["deci.embedding_length"] == len(hidden)
    if case == "llama3-rope":
        assert "rope_freqs.weight" in _metadata(out)["tensors"]
    if removed:
        assert _metadata(out)["deci.attention.head_count"] == [2, 2]


@needs_llamacpp
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q4_k_m"])
def test_llamacpp_other_outtypes(tmp_path, outtype):
    """f16 / bf16 written here; q4_k_m by llama.cpp's own quantizer from an f16 file (64-column rows are not whole
    256-value k-quant blocks, so llama.cpp picks its fallback types: the path runs, the file is checked)."""
    folder = pruned_folder(tmp_path, "p", PER_LAYER)
    out = tmp_path / f"p-{outtype}.gguf"
    report = export_gguf(folder, out, outtype=outtype)
    assert report.verified and out.is_file() and _metadata(out)["general.architecture"] == "deci"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", out.name]  # the f16 intermediate is gone
    compare_logits(_hf_logits(folder, _fresh_ids()), run_gguf(out, _fresh_ids())["logits"], outtype)


@needs_llamacpp
def test_tokenizer_and_chat_template_in_llamacpp(tmp_path):
    """The embedded tokenizer tokenizes like the model's own (special tokens included), BOS as it adds it."""
    folder = pruned_folder(tmp_path, "dense")
    tok = _tokenizer()
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(folder)
    out = tmp_path / "d.gguf"
    export_gguf(folder, out, outtype="f16")
    meta = _metadata(out)
    assert meta["tokenizer.chat_template"] == tok.chat_template and meta["tokenizer.ggml.add_bos_token"] == 1
    texts = ["Hello world! 12345 don't", "<s>x</s> y", "  two  spaces\nand a newline"]
    got = run_gguf(out, [0, 5], texts)["tokens"]
    assert got == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@needs_llamacpp
def test_failed_check_leaves_nothing(tmp_path, monkeypatch):
    """A file whose q/k rows are in transformers' order runs in llama.cpp but computes something else: the check
    refuses it and neither the output nor a temporary file is left."""
    import llmprune.checkpoint.gguf_export as ge

    folder = pruned_folder(tmp_path, "p", PER_LAYER)
    monkeypatch.setattr(ge, "_interleave_rope", lambda w, head_dim: w)
    with pytest.raises(VerificationError, match="differ from transformers"):
        export_gguf(folder, tmp_path / "bad.gguf", outtype="f32")
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


@needs_llamacpp
def test_file_llamacpp_cannot_load_is_refused(tmp_path, monkeypatch):
    """A file llama.cpp rejects (a missing tensor) is one line, nothing written."""
    import llmprune.checkpoint.gguf_export as ge

    folder = pruned_folder(tmp_path, "p", PER_LAYER)
    real = ge._layer_tensors
    monkeypatch.setattr(ge, "_layer_tensors", lambda layer, i, hd: [t for t in real(layer, i, hd)
                                                                     if t[0] != "blk.1.ffn_up.weight"])
    with pytest.raises(VerificationError, match="llama.cpp cannot run the exported file"):
        export_gguf(folder, tmp_path / "bad.gguf", outtype="f16")
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


@needs_llamacpp
def test_cli_export(tmp_path, capsys):
    folder = pruned_folder(tmp_path, "p", PER_LAYER, tied=False)
    out = tmp_path / "p.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out), "--outtype", "q8_0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "deci" in line and "q8_0" in line and "top-1" in line and out.is_file()
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600
    assert main(["export", str(folder), "--out", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


@needs_llamacpp
def test_prune_export_gguf_into_the_output_folder(tmp_path, ref_model_path, capsys):
    """``prune --export gguf``: the verified GGUF lands in the output folder (so ``push`` uploads it)."""
    out = tmp_path / "pruned"
    assert main(["prune", str(ref_model_path), "--heads", "0.25", "--ffn", "0.25", "--method", "magnitude",
                 "--allocation", "global", "--out", str(out), "--quiet", "--export", "gguf", "--outtype", "q8_0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    gguf_file = out / "pruned-Q8_0.gguf"
    assert gguf_file.is_file() and str(gguf_file) in line
    assert _metadata(gguf_file)["general.architecture"] in ("deci", "llama")


def test_prune_export_refuses_before_any_work(tmp_path, capsys):
    model = tiny_causal_lm("qwen3", vocab_size=VOCAB)
    src = tmp_path / "src"
    save_pruned(model, src, tokenizer=_tokenizer())
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--ffn", "0.25", "--method", "magnitude", "--out", str(out), "--quiet",
                 "--export", "gguf", "--no-verify"]) == 2
    assert "'qwen3' is not supported" in capsys.readouterr().err and not out.exists()


def test_push_uploads_gguf_with_card(tmp_path):
    """``push --gguf FILE``: one commit with the safetensors, the GGUF and a card carrying llama.cpp / Ollama
    commands and the recipe's perplexities as model-index results (tested against the local Hub server)."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from hub_server import LocalHub

    folder = pruned_folder(tmp_path, "p", PER_LAYER)
    recipe = json.loads((folder / "llmprune_recipe.json").read_text())
    recipe.update(ppl_before=20.5, ppl_after=24.25, ppl_protocol="wikitext2-raw-test.txt, first 60000 tokens")
    (folder / "llmprune_recipe.json").write_text(json.dumps(recipe))
    gguf_file = tmp_path / "p-Q8_0.gguf"
    export_gguf(folder, gguf_file, outtype="q8_0", verify=False)
    with LocalHub(tmp_path / "hub") as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_test",
                   HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join(sys.path))
        code = (f"from llmprune.cli import main; raise SystemExit(main(['push', {str(folder)!r}, 'acme/small', "
                f"'--gguf', {str(gguf_file)!r}]))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pushed = hub.state.repo_dir("acme/small")
        assert (pushed / "model.safetensors").is_file()
        assert (pushed / "p-Q8_0.gguf").read_bytes() == gguf_file.read_bytes()
        card = (pushed / "README.md").read_text()
    assert "ollama run hf.co/acme/small:Q8_0" in card and "llama-cli -hf acme/small:Q8_0" in card and "deci" in card
    meta = yaml.safe_load(card.split("---\n")[1])
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in metrics] == [("perplexity", 24.25), ("perplexity", 20.5)]
    assert (folder / "README.md").read_text() != card  # the local card is left as it was


def test_card_update_is_idempotent():
    """Pushing twice gives one model-index and one llama.cpp section (the later push's)."""
    import yaml

    from llmprune.checkpoint.hub_card import GGUF_SECTION_TITLE, card_results, update_card

    card = "---\nlibrary_name: transformers\ntags:\n- pruned\n---\n\n# Pruned\n\nText.\n"
    results = card_results({"ppl_before": 28.8, "ppl_after": 45.4, "ppl_protocol": "wiki.txt, first 20000 tokens"},
                           {"pruned": {"piqa acc": 0.61, "ppl": 45.0}, "dense": {"piqa acc": 0.66}})
    once = update_card(card, "me/m", ["m-Q8_0.gguf"], results)
    twice = update_card(once, "me/m", ["m-F16.gguf"], results)
    assert twice.count(GGUF_SECTION_TITLE) == 1 and "hf.co/me/m:F16" in twice and "hf.co/me/m:Q8_0" not in twice
    assert twice.count("model-index:") == 1 and twice.endswith("```\n") and "Text." in twice
    meta = yaml.safe_load(twice.split("---\n")[1])
    assert meta["tags"] == ["pruned"]
    names = [m["name"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert names == ["Perplexity", "Perplexity of the model before pruning", "piqa acc", "piqa acc (before pruning)"]
    assert update_card(card, "me/m") == card  # nothing to add: unchanged
