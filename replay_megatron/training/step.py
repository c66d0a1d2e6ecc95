"""One optimizer step over a global batch with megatron-core's pipeline schedule (any TP/PP/DP)."""
from __future__ import annotations

import math
from typing import Any

import torch

from replay_megatron.models.qwen3 import causal_attention_mask, packed_attention_mask
from replay_megatron.platform.exact_sum import all_reduce_float64
from replay_megatron.training.faults import any_rank, has_nonfinite
from replay_megatron.training.objectives import FullVocabCE, Objective


def _tokens(micro_batch: Any) -> torch.Tensor:
    return getattr(micro_batch, "batch", micro_batch).tokens


def train_step(model, optimizer, micro_batches: list, objective: Objective | None = None) -> dict[str, float]:
    """Forward/backward over this DP rank's micro-batches, then one optimizer step.

    Returns the loss (per-token mean over the global batch: sum over micro-batches and DP ranks divided
    by the global count, as Megatron's `calculate_per_token_loss` defines it; the same value on every
    rank), its count of loss tokens, the global batch's real (non-pad) positions `real_tokens`, the
    gradient norm and whether the update was applied. A NaN/Inf loss or gradient on any rank
    skips the optimizer step on all ranks (`skipped`; weights and optimizer state untouched).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    objective = objective or FullVocabCE()
    b, s = _tokens(micro_batches[0]).shape
    mask = causal_attention_mask(s, _tokens(micro_batches[0]).device)

    def forward_step(data_iterator, chunk):
        micro_batch = next(data_iterator)
        batch = getattr(micro_batch, "batch", micro_batch)
        output = objective.forward(chunk, micro_batch, packed_attention_mask(batch.position_ids) if batch.packed
                                   else mask)
        return output, lambda out: objective.loss(out, micro_batch)

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b, forward_only=False)
    device = _tokens(micro_batches[0]).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        for logged in losses:
            totals[:2] += next(iter(logged.values())).double()
        totals[2] = sum(getattr(m, "batch", m).segments[:, 3].sum() for m in micro_batches)
    # sum over DP; only the last stage holds nonzero totals, so a sum over PP broadcasts them
    totals = all_reduce_float64(totals, group=parallel_state.get_data_parallel_group())
    totals = all_reduce_float64(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens, real = totals.tolist()
    loss = loss_sum / max(tokens, 1.0)
    result = {"loss": loss, "tokens": int(tokens), "real_tokens": int(real)}
    grads = [b.grad_data for b in getattr(model, "buffers", []) + getattr(model, "expert_parallel_buffers", [])]
    if any_rank(has_nonfinite(grads, device) | (not math.isfinite(loss)), device):
        return {**result, "grad_norm": float("nan"), "update_ok": False, "skipped": True}
    update_ok, grad_norm, _ = optimizer.step()
    return {**result, "grad_norm": float(grad_norm or 0.0), "update_ok": bool(update_ok), "skipped": False}
