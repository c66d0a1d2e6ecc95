"""Tiny random Qwen3 models and batches shared by tests (built with transformers' config class, no hub)."""
from __future__ import annotations

from typing import Any

import torch

from replay_megatron.models.presets import preset


def tiny_hf_config(name: str = "qwen3-tiny", **overrides: Any) -> dict[str, Any]:
    """A tiny Qwen3 config dict (head_dim != hidden/heads, 2 KV groups for 4 heads)."""
    return preset(name, **overrides)


def tiny_hf_model(hf: dict[str, Any], seed: int = 0):
    """A transformers Qwen3ForCausalLM with random weights (larger init so logits are not all ~0)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**{**hf, "initializer_range": 0.2})
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():  # random norm weights, so a swapped norm would show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The HF state dict with tensors detached and contiguous (picklable for spawned ranks)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def random_tokens(hf: dict[str, Any], batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf["vocab_size"], (batch, seq), generator=g)
