"""Bad input gets a clear error and leaves nothing behind."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmprune import CalibrationError, PruneConfig, RatioError, UnsupportedArchitectureError
from llmprune import prune
from llmprune.cli import main
from llmprune.checkpoint.io import CheckpointError, OutputExistsError, load_model, save_pruned

from tiny_models import tiny_causal_lm


def test_unknown_architecture_names_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="'bloom' is not supported.*llama"):
        prune(model, PruneConfig(ffn=0.25, method="magnitude"))


@pytest.mark.parametrize("kwargs", [dict(heads=1.0), dict(ffn=-0.1), dict(heads=1.5), dict(layers=-1),
                                    dict(allocation="random")])
def test_ratio_out_of_range(kwargs):
    with pytest.raises(ValueError, match="range|must be|choose one of"):
        PruneConfig(**kwargs)


def test_ratio_incompatible_with_gqa_and_rounding():
    model = tiny_causal_lm("llama")  # 4 heads, 2 KV heads: whole groups of 2 heads
    with pytest.raises(RatioError, match=r"removes 1 of 4 heads.*2 at a time.*Valid ratios: 0.5"):
        prune(model, PruneConfig(heads=0.25, method="magnitude", attention_unit="group", rounding="error"))
    # 'query' mode removes one head from each of the 2 groups at a time: 0.25 still impossible
    with pytest.raises(RatioError):
        prune(model, PruneConfig(heads=0.25, method="magnitude", attention_unit="query", rounding="error"))
    result = prune(model, PruneConfig(heads=0.25, method="magnitude", attention_unit="group", rounding="up"),
                   progress=False)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert result.plan.layers[0].kept_kv_heads is not None


def test_removing_every_head_is_rejected():
    model = tiny_causal_lm("llama")
    with pytest.raises(RatioError, match="every attention head"):
        prune(model, PruneConfig(heads=0.9, method="magnitude", rounding="up"))


def test_missing_and_empty_calibration(tmp_path):
    model = tiny_causal_lm("llama")
    with pytest.raises(CalibrationError, match="needs calibration data"):
        prune(model, PruneConfig(ffn=0.25, method="wanda"))
    with pytest.raises(CalibrationError, match="does not exist"):
        prune(model, PruneConfig(ffn=0.25, method="wanda"), tokenizer=object(), calibration=tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="is empty"):
        prune(model, PruneConfig(ffn=0.25, method="wanda"), tokenizer=object(), calibration=empty)


def test_calibration_text_shorter_than_window(tmp_path, ref_model):
    model, tok = ref_model
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(CalibrationError, match="fewer than one window"):
        prune(model, PruneConfig(ffn=0.25, method="wanda", seq_len=256), tokenizer=tok, calibration=short)


def test_existing_output_dir_is_refused_and_kept(tmp_path):
    model = tiny_causal_lm("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_pruned(model, out)
    assert (out / "keep.txt").read_text() == "precious"
    save_pruned(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup dirs left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_causal_lm("llama")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_pruned(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_checkpoint(tmp_path, ref_model_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(ref_model_path, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        weights.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    else:
        weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_model(bad)


def test_pickled_weights_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are not loaded"):
        load_model(folder)


def test_cli_errors_leave_no_output(tmp_path, ref_model_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", str(ref_model_path), "--heads", "0.3", "--out", str(out), "--quiet",
               "--method", "magnitude", "--rounding", "error"])
    assert rc == 2 and "Valid ratios" in capsys.readouterr().err
    rc = main(["prune", str(ref_model_path), "--ffn", "0.25", "--calib", str(tmp_path / "missing.txt"),
               "--out", str(out), "--quiet"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# Seeded random bytes with fixed ids: every pytest-xdist worker must collect the same test names.
@pytest.mark.parametrize("content", [bytes(range(256)) * 12, __import__("random").Random(0).randbytes(3000)],
                         ids=["every-byte", "random-bytes"])
def test_calibration_that_is_not_text_is_refused(tmp_path, ref_model, content):
    model, tok = ref_model
    junk = tmp_path / "random.bin"
    junk.write_bytes(content)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match="not UTF-8 text"):
        prune(model, PruneConfig(ffn=0.25, method="wanda"), tokenizer=tok, calibration=junk)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_text_with_a_few_stray_bytes_is_accepted(tmp_path):
    from llmprune.calibration.text import load_text

    f = tmp_path / "corpus.txt"
    f.write_bytes(("Plain English text. " * 500).encode() + b"\xff\xfe" + " and more.".encode())
    assert load_text(f).startswith("Plain")


def test_cli_refuses_random_bytes_as_calibration(tmp_path, ref_model_path, capsys):
    junk = tmp_path / "random.txt"
    junk.write_bytes(__import__("os").urandom(3000))
    out = tmp_path / "out"
    rc = main(["prune", str(ref_model_path), "--ffn", "0.25", "--calib", str(junk), "--out", str(out), "--quiet"])
    assert rc == 2 and "not UTF-8 text" in capsys.readouterr().err
    assert not out.exists()
