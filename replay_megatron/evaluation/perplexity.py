"""Held-out perplexity (SPEC.md section 5, forgetting): full-vocabulary cross entropy of a megatron-core Qwen3
at any TP/PP/DP, usable on a freshly loaded model (`eval`) or inside the training loop.

The first `max_batches * micro_batch_size` samples (all when `max_batches` is None) are split over DP in
Stage 0's order (`sequential_micro_batches`), so the evaluated set does not depend on DP, and run through
megatron's forward-only pipeline schedule. On the last stage megatron's `vocab_parallel_cross_entropy` takes
the vocab-parallel logits, padded vocabulary columns masked to -inf, and the per-token losses are summed
over loss-bearing tokens. One float64 sum over the world (`platform.exact_sum`), to which only TP rank 0 of
each DP replica's last stage contributes, gives every rank the same (loss sum, token count).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from replay_megatron.data.dataset import GPTBatch, batch_of, sequential_micro_batches
from replay_megatron.data.token_store import TokenDataset
from replay_megatron.models.forward import pipeline_forward, schedule_chunks
from replay_megatron.models.vocab import mask_vocab_padding
from replay_megatron.platform.exact_sum import all_reduce_float64


def _loss_sum_and_count(logits: torch.Tensor, batch: GPTBatch, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """[sum of per-token CE over loss-bearing tokens, their count] (float64) of one micro-batch."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = mask_vocab_padding(logits.float(), tp_rank * logits.shape[-1], vocab_size)
    losses = vocab_parallel_cross_entropy(logits, batch.labels)  # [b, s]; TP-reduced inside
    mask = batch.loss_mask > 0
    return torch.stack([losses[mask].double().sum(), mask.sum().double()])


def evaluate_perplexity(model: torch.nn.Module, dataset: TokenDataset, *, seq_length: int, micro_batch_size: int,
                        max_batches: int | None, layout, vocab_size: int) -> dict[str, Any]:
    """{"eval_loss" (per-token mean CE), "perplexity" (exp of it), "tokens"} of `dataset` under `model`.

    `model` is this rank's stage of the GPTModel (unwrapped from DDP), in eval mode; `layout` the
    `ParallelLayout`; `vocab_size` the model's unpadded vocabulary (HF `vocab_size`): logit columns past it
    are TP/divisibility padding. A collective: every rank calls it; every rank gets the result.
    """
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * micro_batch_size)
    index_batches = list(sequential_micro_batches(n, micro_batch_size, layout.dp, layout.dp_rank))
    device = layout.device.torch_device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for idx_batches in schedule_chunks(index_batches, len, layout.pp):
        batches = [batch_of(dataset, idx, seq_length).to(device) for idx in idx_batches]
        results = pipeline_forward(model, [b.tokens for b in batches],
                                   lambda out, i: _loss_sum_and_count(out, batches[i], vocab_size, layout.tp_rank))
        if layout.is_last_stage and layout.tp_rank == 0:
            for r in results:
                totals += r
    loss_sum, tokens = all_reduce_float64(totals).tolist()
    if tokens == 0:
        raise ValueError(f"held-out set {dataset.path}: no loss-bearing tokens in the {n} samples evaluated")
    eval_loss = loss_sum / tokens
    return {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss), "tokens": int(tokens)}


def configured_perplexity(model: torch.nn.Module, dataset: TokenDataset, cfg, layout,
                          vocab_size: int) -> dict[str, Any]:
    """`evaluate_perplexity` with a run config's sequence length and eval batch settings (train's periodic
    eval and the `eval` command)."""
    return evaluate_perplexity(model, dataset, seq_length=cfg.data.seq_length,
                               micro_batch_size=cfg.eval.micro_batch_size, max_batches=cfg.eval.max_batches,
                               layout=layout, vocab_size=vocab_size)
