"""MuonClip as the paper ran it ("we simulate QK-Clip by gradient clipping on attention layers"): before
each optimizer step the gradients of every attention-layer parameter (`self_attention.*`: QKV and output
projections, q/k norms) are scaled together so that their norm is at most `max_norm`.

The norm is the logical one: summed over the model-parallel group (TP x PP) with megatron-core's own
`get_grad_norm_fp32`, each TP-replicated tensor counted once (`stats.counts_toward_global_stats`); the
gradients are the DDP `main_grad`s after their DP reduction, whole on every DP rank (megatron's Muon does
not run under the distributed optimizer). megatron-core's real QK-clip (`optimizer/qk_clip.py`) needs the
attention to record its max logit and to offer `clip_qk`; up to 0.16.1 only multi-latent attention does,
not the self-attention of Qwen3.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from megatron.core.optimizer import ChainedOptimizer

from replay_megatron.optim.stats import counts_toward_global_stats


class AttentionGradClip:
    """Clips the attention layers' gradient norm of `model_chunks` to `max_norm`; `last_norm` is the norm
    before clipping at the last call."""

    def __init__(self, model_chunks: Sequence[Any], max_norm: float) -> None:
        if max_norm <= 0:
            raise ValueError(f"attention gradient clip must be > 0, got {max_norm}")
        self.params = [p for chunk in model_chunks for name, p in chunk.named_parameters()
                       if p.requires_grad and ".self_attention." in name]
        self.max_norm = max_norm
        self.last_norm = 0.0

    def __call__(self) -> float:
        from megatron.core import parallel_state
        from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

        grads = [p.main_grad for p in self.params]
        counted = [p.main_grad for p in self.params if counts_toward_global_stats(p)]
        self.last_norm = get_grad_norm_fp32(counted, 2, parallel_state.get_model_parallel_group())
        scale = self.max_norm / (self.last_norm + 1e-6)  # megatron's clip_grad_by_total_norm_fp32 rule
        if scale < 1.0 and grads:
            torch._foreach_mul_(grads, scale)
        return self.last_norm


class AttentionClippedOptimizer(ChainedOptimizer):
    """megatron-core's ChainedOptimizer that clips the attention layers' gradients (`clip`) before its
    wrappers copy them to their main params, i.e. before the global grad-norm clip and the step."""

    def __init__(self, chained_optimizers: list, clip: AttentionGradClip) -> None:
        super().__init__(chained_optimizers)
        self.attention_clip = clip

    def prepare_grads(self) -> bool:
        self.attention_clip()
        return super().prepare_grads()
