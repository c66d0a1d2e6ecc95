"""Named Qwen3 shapes (SPEC.md section 6) as Hugging Face `config.json` dicts, plus tiny test shapes.

A preset is the same thing a user's HF checkpoint directory provides, so presets and real checkpoints go
through one code path (`Qwen3Config(**preset)` -> megatron-core TransformerConfig).
"""
from __future__ import annotations

import copy
from typing import Any

_QWEN3_COMMON: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "head_dim": 128,
    "hidden_act": "silu",
    "attention_bias": False,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16",
}


def _qwen3(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool) -> dict[str, Any]:
    return {**_QWEN3_COMMON, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": ffn, "tie_word_embeddings": tied}


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _qwen3(1024, 28, 16, 8, 3072, tied=True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 8, 6144, tied=True),
    "qwen3-4b": _qwen3(2560, 36, 32, 8, 9728, tied=True),
    "qwen3-8b": _qwen3(4096, 36, 32, 8, 12288, tied=False),
    # Test shapes: head_dim (32) != hidden/heads (16) and 2 query groups < 4 heads, as in real Qwen3.
    "qwen3-tiny": {**_QWEN3_COMMON, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                   "intermediate_size": 128, "tie_word_embeddings": True, "max_position_embeddings": 512,
                   "torch_dtype": "float32"},
    "qwen3-tiny-untied": {**_QWEN3_COMMON, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                          "intermediate_size": 128, "tie_word_embeddings": False,
                          "max_position_embeddings": 512, "torch_dtype": "float32"},
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset `name`'s HF config dict with `overrides` applied (e.g. vocab_size for a tokenizer)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    cfg.update(overrides)
    return cfg
