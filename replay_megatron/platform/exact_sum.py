"""Float64 sums across ranks without a float64 collective.

HCCL (Ascend 910B) reduces int8..int64, fp16, fp32 and bf16 only, and an fp32 all-reduce would lose the
precision MoClip's global cosine and the loss / perplexity / L2 totals need (partial sums of opposite
sign cancel). So each rank's float64 values travel as their raw bits (an int32 view) in one all-gather,
and every rank adds the gathered rows itself, in rank order: the result is the float64 sum of the same
addends on every rank, bit-identical across ranks and across backends (NCCL, HCCL, gloo).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def all_reduce_float64(values: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The float64 SUM of `values` (1-D, float64, on the collective's device) over `group` (None: the world).

    One all-gather of 8 * numel bytes per rank; returns a new tensor on `values`' device.
    """
    if values.dtype != torch.float64 or values.dim() != 1:
        raise TypeError(f"all_reduce_float64 takes a 1-D float64 tensor, got {values.dtype} {tuple(values.shape)}")
    world = dist.get_world_size(group)
    if world == 1:
        return values.clone()
    bits = values.contiguous().view(torch.int32)
    gathered = torch.empty(world * bits.numel(), dtype=torch.int32, device=values.device)
    dist.all_gather_into_tensor(gathered, bits, group=group)
    return gathered.view(torch.float64).view(world, values.numel()).sum(0)
