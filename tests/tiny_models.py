"""Tiny random models of every supported family, built from configs (no downloads).

Each entry: model_type -> config kwargs. GQA is on wherever the family supports it.
Adding a family to the tests is one entry here. A key ``"<model_type>:<variant>"`` tests another
layout of the same family (e.g. Falcon's multi-query vs. new decoder architecture).
"""

from __future__ import annotations

import torch

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, max_position_embeddings=64)
_GQA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96)

TINY_CONFIGS: dict[str, dict] = {
    "llama": {**_COMMON, **_GQA},
    "mistral": {**_COMMON, **_GQA, "sliding_window": 8},
    "qwen2": {**_COMMON, **_GQA},  # q/k/v biases
    "qwen3": {**_COMMON, **_GQA},  # q_norm / k_norm
    "gemma2": {**_COMMON, **_GQA, "sliding_window": 8, "query_pre_attn_scalar": 16},
    "gemma3_text": {**_COMMON, **_GQA, "sliding_window": 8, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "phi3": {**_COMMON, **_GQA, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},  # fused qkv_proj / gate_up_proj
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                 bos_token_id=1, eos_token_id=2),  # Conv1D; n_inner None = 4*n_embd
    "opt": dict(vocab_size=128, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=3, num_attention_heads=4,
                ffn_dim=96, max_position_embeddings=64, do_layer_norm_before=True),
    "opt:post_ln": dict(vocab_size=128, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=3,
                        num_attention_heads=4, ffn_dim=96, max_position_embeddings=64, do_layer_norm_before=False),
    "gpt_neox": {**_COMMON, "num_attention_heads": 4, "intermediate_size": 96, "rotary_pct": 0.25},  # interleaved qkv
    "falcon": {**_COMMON, "num_attention_heads": 4, "ffn_hidden_size": 96, "multi_query": True},  # MQA, parallel attn
    "falcon:new": {**_COMMON, "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 96,
                   "new_decoder_architecture": True},  # GQA, blocked [q.. k v] per group
    "falcon:mha": {**_COMMON, "num_attention_heads": 4, "ffn_hidden_size": 96, "multi_query": False,
                   "parallel_attn": False, "bias": True},  # per-head [q k v], sequential, biases
}

CAUSAL_LM_TYPES = list(TINY_CONFIGS)
#: variants that differ from their family's main entry only in norm/residual placement or in the qkv layout,
#: run with the calibration + layer-removal case of the equivalence test only (keeps the suite fast)
LIGHT_VARIANTS = ("opt:post_ln", "falcon:mha")


_BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, max_position_embeddings=64,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2)
MOE_CONFIGS = {
    # norm_topk_prob=False: removing an expert changes the softmax denominators of the others
    "qwen3_moe": dict(_BASE, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                      norm_topk_prob=False, mlp_only_layers=[1]),
    "mixtral": dict(_BASE, num_local_experts=8, intermediate_size=32),
}


def tiny_moe(model_type: str, seed: int = 0, **overrides):
    """A tiny random MoE causal LM of ``model_type`` (a key of ``MOE_CONFIGS``) with spread-out routing."""
    model = tiny_causal_lm(model_type, seed, configs=MOE_CONFIGS, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):  # spread routing so expert choice matters
                p.normal_(0, 0.5)
    return model


def base_type(key: str) -> str:
    """``"falcon:new"`` -> ``"falcon"`` (the config's model_type)."""
    return key.split(":")[0]


def tiny_causal_lm(model_type: str, seed: int = 0, configs: dict[str, dict] | None = None, **overrides):
    """A tiny random causal LM of ``model_type`` from ``configs`` (default ``TINY_CONFIGS``) updated with
    ``overrides`` (e.g. ``tie_word_embeddings=False``) (fp32, eval mode, eager attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(base_type(model_type), **{**(configs or TINY_CONFIGS)[model_type], **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init has tiny norms' effects; perturb norms and biases so every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def assert_reloads_identically(model, folder, ids: torch.Tensor):
    """``from_pretrained(folder)`` rebuilds ``model``: same class, bit-identical state and logits."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    return reloaded


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint folder's safetensors shards, by name."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
