"""Relative L2 distance `|theta_ft - theta_base| / |theta_base|` over all parameters (SPEC.md section 5,
forgetting), for two models with the same TP/PP layout.

Each rank sums over the parameters it counts under megatron-core's grad-norm rule
(`optim.stats.counts_toward_global_stats`: a TP-replicated tensor such as a norm weight on TP rank 0 only,
the last stage's copy of a tied embedding not at all), then one collective over the model-parallel group
(every TP rank and PP stage of a DP replica; DP replicas hold the same weights) gives every rank the
logical model's sums. Sums are float64 (combined across ranks by `platform.exact_sum`, which HCCL carries),
so the result does not depend on TP/PP beyond round-off.
"""
from __future__ import annotations

import math

import torch

from replay_megatron.platform.exact_sum import all_reduce_float64


def relative_l2_distance(model: torch.nn.Module, base: torch.nn.Module) -> float:
    """|theta_model - theta_base| / |theta_base| of this rank's stages `model` and `base` (same layout;
    a collective over the model-parallel group)."""
    from megatron.core import parallel_state as ps

    from replay_megatron.optim.stats import counts_toward_global_stats

    named, base_named = list(model.named_parameters()), list(base.named_parameters())
    if [n for n, _ in named] != [n for n, _ in base_named]:
        raise ValueError("relative_l2_distance: the two models have different parameters (same TP/PP layout "
                         "and model config needed)")
    device = named[0][1].device if named else torch.device("cpu")
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [|theta - theta_base|^2, |theta_base|^2]
    for (name, p), (_, b) in zip(named, base_named):
        if p.shape != b.shape:
            raise ValueError(f"relative_l2_distance: parameter {name} has shape {tuple(p.shape)} vs "
                             f"{tuple(b.shape)} in the base model")
        if counts_toward_global_stats(p):
            b64 = b.detach().double()
            sums[0] += (p.detach().double() - b64).square().sum()
            sums[1] += b64.square().sum()
    diff_sq, base_sq = all_reduce_float64(sums, group=ps.get_model_parallel_group()).tolist()
    if base_sq == 0:
        raise ValueError("relative_l2_distance: the base model's parameters are all zero")
    return math.sqrt(diff_sq) / math.sqrt(base_sq)
