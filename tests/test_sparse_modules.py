"""Kernel-backed modules (llmprune.runtime): equivalence with nn.Linear / the dense MLP, use_kernels on
the reference Llama, single CPU-fallback warning, JSON config round trip, safetensors save/load.

Module-vs-dense tolerances (fp32): 1e-5 (reference path), 1e-4 (Triton interpreter path)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmprune.kernels as tk  # noqa: E402
from llmprune import runtime as sp  # noqa: E402
from llmprune.kernels._common import interpreter_active  # noqa: E402

from conftest import REF_MODEL as _REF  # noqa: E402

REF_MODEL = str(_REF)
needs_model = pytest.mark.skipif(not os.path.isdir(REF_MODEL), reason="reference model not available")
needs_kernels = pytest.mark.skipif(not (tk.HAS_TRITON and (torch.cuda.is_available() or interpreter_active())),
                                   reason="needs Triton with CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def backend():
    old = sp.get_backend()
    yield sp.set_backend
    sp.set_backend(old)


@pytest.fixture(scope="module")
def ref_model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(REF_MODEL).eval()


def _fresh(ref_model):
    import copy
    return copy.deepcopy(ref_model)


def _lin(K=96, N=70, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_act_sparse_linear_threshold_zero_equals_linear(bias, backend):
    backend("reference")
    lin = _lin(bias=bias)
    m = sp.ActSparseLinear.from_linear(lin, 0.0)
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(m(x), lin(x), atol=1e-5, rtol=1e-5)


def test_act_sparse_linear_threshold_equals_linear_of_thresholded_input(backend):
    backend("reference")
    lin = _lin(bias=True)
    m = sp.ActSparseLinear.from_linear(lin, 0.8)
    x = torch.randn(3, 96)
    xs = torch.where(x.abs() > 0.8, x, torch.zeros(()))
    torch.testing.assert_close(m(x), lin(xs), atol=1e-5, rtol=1e-5)


def test_threshold_buffer_survives_dtype_moves():
    m = sp.ActSparseLinear.from_linear(_lin(), 0.123456789)
    m.half()
    assert m.weight_t.dtype == torch.float16
    assert m.threshold.dtype == torch.float32 and m.threshold_value == pytest.approx(0.123456789, rel=1e-7)
    with pytest.raises(ValueError):
        m.set_threshold(-1)


def test_sparse24_linear_equals_masked_dense(backend):
    backend("reference")
    lin = _lin(K=100, N=33, bias=True)
    m = sp.Sparse24Linear.from_linear(lin)
    masked = nn.Linear(100, 33, bias=True)
    masked.weight.data = lin.weight.data * tk.mask_24(lin.weight.data)
    masked.bias.data = lin.bias.data
    x = torch.randn(4, 100)
    torch.testing.assert_close(m(x), masked(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.dense_weight(), masked.weight.data)
    with pytest.raises(ValueError):
        sp.Sparse24Linear.from_linear(lin, strict=True)
    with pytest.raises(ValueError, match="% 4"):
        sp.Sparse24Linear(10, 4)


def test_gather_mlp_equals_masked_dense(backend):
    backend("reference")
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers import LlamaConfig
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu"))
    x = torch.randn(2, 3, 32)
    full = sp.GatherSwiGLUMLP.from_mlp(mlp)
    torch.testing.assert_close(full(x), mlp(x), atol=1e-5, rtol=1e-5)
    idx = [3, 70, 11]
    g = sp.GatherSwiGLUMLP.from_mlp(mlp, idx)
    mask = torch.zeros(80)
    mask[idx] = 1
    ref = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * mask)
    torch.testing.assert_close(g(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        g.set_index([1, 1])


@needs_kernels
def test_modules_kernel_path_in_interpreter(backend):
    backend("kernel")
    lin = _lin(K=64, N=40, bias=True)
    x = torch.randn(3, 64)
    a = sp.ActSparseLinear.from_linear(lin, 0.5)
    xs = torch.where(x.abs() > 0.5, x, torch.zeros(()))
    torch.testing.assert_close(a(x), lin(xs), atol=1e-4, rtol=1e-4)
    s = sp.Sparse24Linear.from_linear(lin)
    torch.testing.assert_close(s(x), nn.functional.linear(x, s.dense_weight(), lin.bias), atol=1e-4, rtol=1e-4)


def test_config_json_roundtrip():
    cfg = sp.KernelConfig(activation_sparsity={"*.mlp.*": 0.5, "*": 0.4}, thresholds={"a.q_proj": 0.1},
                            weight_24=True, targets=["*.q_proj", "*.down_proj"], ffn_neurons={"m": [1, 2]})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert sp.KernelConfig.from_dict(d) == cfg
    assert sp.KernelConfig.from_json(cfg.to_json()) == cfg
    assert cfg.sparsity_for("model.layers.0.mlp.up_proj") == 0.5 and cfg.sparsity_for("x.q_proj") == 0.4
    with pytest.raises(ValueError):
        sp.KernelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        sp.KernelConfig(activation_sparsity=1.5)


def test_sparsify_needs_thresholds_or_calibration():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8))
    with pytest.raises(ValueError, match="calib_batches"):
        sp.use_kernels(model, sp.KernelConfig(targets=["q_proj"], activation_sparsity=0.5))


@needs_model
def test_sparsify_generate_on_cpu_warns_once(ref_model, backend):
    backend("auto")
    model = _fresh(ref_model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = sp.KernelConfig(activation_sparsity=0.5)
    sp.reset_fallback_warning()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sp.use_kernels(model, cfg, calib_batches=[ids])
        with torch.no_grad():
            model(ids)
        out = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    ours = [w for w in rec if "llmprune.runtime" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert out.shape == (1, 22)
    n_sparse = sum(isinstance(m, sp.ActSparseLinear) for m in model.modules())
    assert n_sparse == 7 * model.config.num_hidden_layers
    assert isinstance(model.lm_head, nn.Linear)
    # calibrated thresholds hit the target sparsity on the calibration data
    seen = []
    h = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    t = model.model.layers[2].mlp.down_proj.threshold_value
    frac = (seen[0].abs() <= t).float().mean().item()
    assert abs(frac - 0.5) < 0.02


@needs_model
@pytest.mark.parametrize("weight_24", [False, True])
def test_save_load_roundtrip_identical_logits(ref_model, tmp_path, backend, weight_24):
    backend("reference")
    model = _fresh(ref_model)
    names = sp.find_targets(model, sp.KernelConfig())
    thresholds = {n: 0.05 * (i % 3) for i, n in enumerate(names)}
    cfg = sp.KernelConfig(thresholds=thresholds, weight_24=weight_24,
                            ffn_neurons={"model.layers.1.mlp": list(range(0, 768, 3))})
    sp.use_kernels(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    out = tmp_path / "sparse-model"
    sp.save_compressed(model, out)
    files = sorted(os.listdir(out))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "sparse_config.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left behind
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        if weight_24:
            assert f.get_tensor("model.layers.0.self_attn.q_proj.meta").dtype == torch.uint8
            assert tuple(f.get_slice("model.layers.0.self_attn.q_proj.values").get_shape()) == (256, 128)
    assert "lm_head.weight" not in keys  # tied to the embeddings
    loaded = sp.load_compressed(out)
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    assert loaded.llmprune_kernel_config == cfg
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with pytest.raises(FileExistsError):
        sp.save_compressed(model, out)
    # save_pretrained of a sparsified model stores the same compressed format
    via_hf = tmp_path / "via-save-pretrained"
    model.save_pretrained(via_hf)
    assert sorted(os.listdir(via_hf)) == files
    with torch.no_grad():
        assert torch.equal(sp.load_compressed(via_hf)(ids).logits, before)
    with pytest.raises(FileExistsError):
        model.save_pretrained(via_hf)


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, llmprune.kernels as tk, llmprune.runtime as sp\n"
            "assert not tk.HAS_TRITON\n"
            "m = sp.ActSparseLinear.from_linear(torch.nn.Linear(8, 4), 0.1)\n"
            "import warnings; warnings.simplefilter('error')\n"
            "try:\n    m(torch.randn(2, 8))\nexcept RuntimeWarning as e:\n    print('warned', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                                    + sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Triton is not installed" in r.stdout
