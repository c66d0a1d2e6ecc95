"""Distributed statistics for the optimizers (SPEC.md sections 3 and 4).

MoClip's three global sums count every element of the logical model once: each rank sums over the
parameters (or distributed-optimizer shards) it counts, then one collective combines them in float64
(`platform.exact_sum`: HCCL has no float64 all-reduce). Which
parameters a rank counts follows megatron-core's gradient-norm rule (`get_main_grads_for_grad_norm`):
not `shared` (the last pipeline stage's copy of a tied embedding) and not a tensor-parallel duplicate
(a TP-replicated tensor, e.g. a norm weight, counts on TP rank 0 only). The group is the one Megatron
reduces the gradient norm over (`optimizer.get_grad_stats_parallel_group()`: the model-parallel group,
or everything with the distributed optimizer).

The per-tensor baselines (TAM, MoFO) reduce statistics of whole logical tensors through
`tensor_layout.TensorLayout` instead.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from replay_megatron.platform.exact_sum import all_reduce_float64


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
