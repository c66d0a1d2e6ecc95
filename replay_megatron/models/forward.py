"""Forward-only passes through a (possibly pipelined) Qwen3 GPTModel with megatron-core's schedule.

Used wherever full-vocabulary logits are the point: conversion parity checks, perplexity evaluation and
generation. Training and Stage 0 never gather the vocabulary; they use their own loss functions.
"""
from __future__ import annotations

from itertools import groupby
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from replay_megatron.models.qwen3 import causal_attention_mask, packed_attention_mask


def pipeline_forward(model: torch.nn.Module, micro_batches: list[torch.Tensor],
                     on_output: Callable[[torch.Tensor, int], object],
                     packed_positions: list[torch.Tensor | None] | None = None) -> list:
    """Run `model` forward-only over micro-batches of token ids [b, s] with megatron's pipeline schedule.

    On the last pipeline stage `on_output(output, index)` receives the model output ([b, s, V/TP] logits)
    of micro-batch `index` and its results are returned in order; other stages return [].
    `packed_positions[i]`, where given, are the position ids of micro-batch i's packed rows (several
    samples per row: the block-diagonal mask); otherwise one sample per row.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    b, s = micro_batches[0].shape
    mask = causal_attention_mask(s, micro_batches[0].device)
    position_ids = torch.arange(s, device=micro_batches[0].device).expand(b, s)
    counter = iter(range(len(micro_batches)))
    data = iter(micro_batches)

    def forward_step(data_iterator, chunk):
        tokens = next(data_iterator)
        index = next(counter)
        packed = packed_positions[index] if packed_positions else None
        output = chunk(tokens, position_ids[: tokens.shape[0]], mask) if packed is None else \
            chunk(tokens, packed, packed_attention_mask(packed))
        return output, lambda out, non_loss_data=True: on_output(out, index)

    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=[model],
            num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b,
            forward_only=True, collect_non_loss_data=True)


Item = TypeVar("Item")
MICRO_BATCHES_PER_STAGE = 4  # micro-batches in flight per pipeline stage in one forward-only schedule call


def schedule_chunks(items: Sequence[Item], size: Callable[[Item], int], pp: int) -> Iterator[list[Item]]:
    """`items` (one per micro-batch) in runs for one `pipeline_forward` call each: consecutive items of equal
    micro-batch `size` (a schedule call needs equal sizes), at most MICRO_BATCHES_PER_STAGE * pp per run."""
    per_call = MICRO_BATCHES_PER_STAGE * pp
    for _, same_size in groupby(items, key=size):
        same_size = list(same_size)
        for start in range(0, len(same_size), per_call):
            yield same_size[start:start + per_call]


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """All-gather vocab-parallel logits [..., V/TP] over TP and drop the padding rows -> [..., V]."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]


def full_logits(model: torch.nn.Module, micro_batches: list[torch.Tensor], vocab_size: int) -> list[torch.Tensor]:
    """Full-vocabulary fp32 logits [b, s, V] per micro-batch on the last stage ([] elsewhere)."""
    return pipeline_forward(model, micro_batches, lambda out, _: gather_vocab(out.float(), vocab_size))
