"""Training objectives: what the last pipeline stage computes from a micro-batch (SPEC.md section 2, 4).

An objective has `forward(model_chunk, micro_batch, attention_mask)` (runs the GPTModel) and
`loss(output, micro_batch) -> (loss_sum, token_count, logs)` (Megatron's per-token loss convention, so the
schedule and DDP reduce it to the per-token mean over the global batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from replay_megatron.data.dataset import GPTBatch
from replay_megatron.models.output_layer import output_layer_of
from replay_megatron.training.replay_head import ReplayTargets, RestrictedCEHead


class Objective(Protocol):
    def forward(self, chunk: torch.nn.Module, micro_batch: Any, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def loss(self, output: torch.Tensor, micro_batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict]: ...


def _per_token(loss_sum: torch.Tensor, count: torch.Tensor, name: str):
    return loss_sum, count.to(torch.int), {name: torch.stack([loss_sum.detach().float(), count.float()])}


class FullVocabCE:
    """Full-vocabulary cross entropy on every loss-bearing token (the SFT baselines)."""

    def forward(self, chunk, micro_batch: GPTBatch, attention_mask):
        return chunk(micro_batch.tokens, micro_batch.position_ids, attention_mask, labels=micro_batch.labels)

    def loss(self, output, micro_batch: GPTBatch):
        mask = micro_batch.loss_mask.float()
        return _per_token((output.float() * mask).sum(), mask.sum(), "lm loss")


@dataclass
class ReplayMicroBatch:
    """A token micro-batch and the Stage 0 candidates of its stored positions."""

    batch: GPTBatch
    targets: ReplayTargets


class RestrictedCE:
    """Logits Replay: restricted cross entropy on the stored candidate sets (SPEC.md section 2), plus
    kl_weight * KL against the stored teacher logits when kl_weight > 0 (default 0: the paper)."""

    def __init__(self, kl_weight: float = 0.0):
        if not kl_weight >= 0:
            raise ValueError(f"RestrictedCE: kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight

    def forward(self, chunk, micro_batch: ReplayMicroBatch, attention_mask):
        tokens, position_ids = micro_batch.batch.tokens, micro_batch.batch.position_ids
        layer, overlap_grad_reduce = output_layer_of(chunk)
        if layer is None:  # not the last pipeline stage: hidden states go on to the next stage
            return chunk(tokens, position_ids, attention_mask)
        if layer.sequence_parallel:
            raise NotImplementedError("the replay loss does not support sequence parallelism yet")
        # the output layer hands the final hidden states and its weight shard to the restricted CE
        head = RestrictedCEHead(micro_batch.targets, self.kl_weight, fuse_main_grad=not overlap_grad_reduce)
        with layer.computing(head):
            return chunk(tokens, position_ids, attention_mask)

    def loss(self, output, micro_batch: ReplayMicroBatch):
        # `output` is [b, s, 1]: the per-position loss at stored positions, 0 elsewhere.
        count = output.new_full((), float(micro_batch.targets.num_positions), dtype=torch.float32)  # no H2D copy
        return _per_token(output.float().sum(), count, "replay loss")


def objective_for(cfg) -> Objective:
    """The run's objective: `train.loss` replay (restricted CE, + KL with train.kl_weight) or full."""
    return RestrictedCE(kl_weight=cfg.train.kl_weight) if cfg.train.loss == "replay" else FullVocabCE()
