"""Distributed statistics for the optimizers (SPEC.md sections 3 and 4).

MoClip's three global sums count every element of the logical model once: each rank sums over the
parameters (or distributed-optimizer shards) it counts, then one collective combines them in float64
(`platform.exact_sum`: HCCL has no float64 all-reduce). Which
parameters a rank counts follows megatron-core's gradient-norm rule (`get_main_grads_for_grad_norm`):
not `shared` (the last pipeline stage's copy of a tied embedding) and not a tensor-parallel duplicate
(a TP-replicated tensor, e.g. a norm weight, counts on TP rank 0 only). The group is the one Megatron
reduces the gradient norm over (`optimizer.get_grad_stats_parallel_group()`: the model-parallel group,
or everything with the distributed optimizer).

The per-tensor baselines (TAM, MoFO) need statistics of whole logical tensors; the hooks here make a
TP-sharded tensor's local statistic the full tensor's (SPEC.md section 4).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from replay_megatron.platform.exact_sum import all_reduce_float64

# A per-tensor statistics hook: (params, local stats [len(params), k]) -> stats of the logical tensors.
TensorSumsReducer = Callable[[Sequence[Tensor], Tensor], Tensor]
# A gather hook: (param, local tensor) -> (logical tensor flattened, positions of the local elements in it).
TensorGather = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def counts_toward_global_stats(param: Tensor, tp_group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether this rank counts `param` in MoClip's global sums: megatron-core's grad-norm filter.

    Uses megatron-core's own `param_is_not_shared` and `param_is_not_tensor_parallel_duplicate`; the
    attributes they read (`shared`, `tensor_model_parallel`) are copied by megatron-core onto fp32 main
    params and distributed-optimizer shards, so the rule applies to whatever the optimizer holds.
    Without `tp_group`, megatron-core's global parallel state names the TP rank.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    if not param_is_not_shared(param):
        return False
    if tp_group is None:
        return param_is_not_tensor_parallel_duplicate(param)
    return param_is_not_tensor_parallel_duplicate(param, tp_group=tp_group)


class GlobalSumsReducer:
    """MoClip's `stats_reducer`: the float64 SUM of the local sums over `group` (None: the world), in one
    collective that NCCL and HCCL both carry (`platform.exact_sum`)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group

    def __call__(self, sums: Tensor) -> Tensor:
        return all_reduce_float64(sums, group=self.group)


def _is_tp_sharded(param: Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


class TensorParallelSums:
    """TAM's per-tensor hook: sums of TP-sharded tensors summed over `tp_group` in float64, in one collective.

    Rows of tensors that are not TP-sharded are whole on every TP rank already and are kept as they are.
    """

    def __init__(self, tp_group: Optional[dist.ProcessGroup] = None) -> None:
        self.tp_group = tp_group

    def __call__(self, params: Sequence[Tensor], sums: Tensor) -> Tensor:
        sharded = torch.tensor([_is_tp_sharded(p) for p in params], device=sums.device).unsqueeze(1)
        reduced = torch.where(sharded, sums, torch.zeros_like(sums)).double().reshape(-1)
        reduced = all_reduce_float64(reduced, group=self.tp_group).view(sums.shape).to(sums.dtype)
        return torch.where(sharded, reduced, sums)


class TensorParallelGather:
    """MoFO's gather hook: the logical tensor of a TP-sharded param (Megatron's `partition_dim` layout).

    Returns the logical tensor flattened and the flat positions of the local shard's elements in it.
    Tensors that are not TP-sharded are returned whole, with positions `0..numel-1`.
    """

    def __init__(self, tp_group: Optional[dist.ProcessGroup] = None) -> None:
        self.tp_group = tp_group

    def __call__(self, param: Tensor, local: Tensor) -> tuple[Tensor, Tensor]:
        positions = torch.arange(local.numel(), device=local.device)
        if not _is_tp_sharded(param):
            return local.reshape(-1), positions
        dim = param.partition_dim
        world = dist.get_world_size(self.tp_group)
        rank = dist.get_rank(self.tp_group)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=self.tp_group)
        full = torch.cat(parts, dim=dim)
        index = torch.arange(full.numel(), device=local.device).view(full.shape)
        shard = index.narrow(dim, rank * local.shape[dim], local.shape[dim])
        return full.reshape(-1), shard.reshape(-1)
