"""Tiny random models of every supported family, built from configs (no downloads).

Each entry: model_type -> config kwargs. GQA is on wherever the family supports it.
Adding a family to the tests is one entry here.
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
}

CAUSAL_LM_TYPES = list(TINY_CONFIGS)


def tiny_causal_lm(model_type: str, seed: int = 0):
    """A tiny random causal LM of ``model_type`` (fp32, eval mode, eager attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init has tiny norms' effects; perturb norms and biases so every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
