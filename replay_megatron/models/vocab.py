"""Vocabulary padding: the model's output rows past the tokenizer's vocabulary (TP / divisibility padding)."""
from __future__ import annotations

import torch


def mask_vocab_padding(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Set the columns of padded vocabulary rows (global id >= V) of a [..., V_local] shard to -inf, in place."""
    pad_from = max(0, vocab_size - vocab_start)
    if pad_from < logits.shape[-1]:
        logits[..., pad_from:] = float("-inf")
    return logits
