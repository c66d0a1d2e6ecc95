"""One optimizer step over a global batch with megatron-core's pipeline schedule (any TP/PP/DP)."""
from __future__ import annotations

from typing import Callable

import torch

from replay_megatron.data.dataset import GPTBatch
from replay_megatron.models.qwen3 import causal_attention_mask


def full_vocab_loss(output: torch.Tensor, loss_mask: torch.Tensor):
    """Per-token SFT loss (sum, count) from GPTModel's per-token cross entropy [b, s] (labels given)."""
    mask = loss_mask.float()
    loss_sum = (output.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()])}


def train_step(model, optimizer, micro_batches: list[GPTBatch],
               loss_fn: Callable = full_vocab_loss) -> dict[str, float]:
    """Forward/backward over the micro-batches, then one optimizer step; returns loss and grad norm.

    The loss is the per-token mean over the global batch (sum over micro-batches and DP ranks divided by
    the global count), as Megatron's `calculate_per_token_loss` defines it.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = micro_batches[0].tokens.shape
    mask = causal_attention_mask(s, micro_batches[0].tokens.device)
    data = iter(micro_batches)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(batch.tokens, batch.position_ids, mask, labels=batch.labels)
        return output, lambda out: loss_fn(out, batch.loss_mask)

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=len(micro_batches),
        seq_length=s, micro_batch_size=b, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for item in losses:
            totals += item["lm loss"].double().cpu()
    # every rank reports the same loss: sum over DP, then take the last stage's value over PP
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return {"loss": (totals[0] / totals[1].clamp_min(1)).item(), "grad_norm": float(grad_norm or 0.0),
            "update_ok": bool(update_ok)}
