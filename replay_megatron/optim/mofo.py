"""MoFO, momentum-filtered Adam (Chen et al. 2025), as SPEC.md section 4 defines the baseline.

AdamW moments on every element; per tensor, only the `k = max(1, floor(numel*fraction))` entries with
the largest `|m|` receive the update (ties at the threshold go to the lower flat index, never more than
k); tensors with one dimension or fewer (norms, biases) are always updated in full. Unselected entries
do not change at all: the decoupled weight decay is filtered with the Adam step,
`theta -= lr * mask * (mhat/(sqrt(vhat)+eps) + weight_decay*theta)`.
The selection is over the logical tensor: `gather` (e.g. `stats.TensorParallelGather`) returns a
shard's full tensor and where the local elements sit in it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from replay_megatron.optim.elementwise import decoupled_update_, run_closure
from replay_megatron.optim.stats import TensorGather


def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest entries of a 1-D tensor; ties at the k-th value go to lower indices."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = torch.kthvalue(values, n - k + 1).values  # the k-th largest
    above = values > threshold
    ties = values == threshold
    return above | (ties & (torch.cumsum(ties, 0) <= k - above.sum()))


class MoFO(torch.optim.Optimizer):
    """Adam that updates, per tensor, only the top `fraction` of entries by |momentum| (SPEC.md section 4)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fraction: float = 0.2,
                 gather: Optional[TensorGather] = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"MoFO: fraction must be in (0, 1], got {fraction}")
        if lr < 0 or weight_decay < 0 or eps <= 0:
            raise ValueError(f"MoFO: need lr >= 0, weight_decay >= 0, eps > 0, got {lr}, {weight_decay}, {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MoFO: betas must be in [0, 1), got {betas}")
        self.gather = gather
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      fraction=fraction))

    def _mask(self, p: Tensor, exp_avg: Tensor, fraction: float) -> Tensor:
        if p.dim() <= 1:
            return torch.ones_like(exp_avg, dtype=torch.bool)
        full, positions = self.gather(p, exp_avg) if self.gather else (exp_avg.reshape(-1), None)
        mask = top_k_mask(full.abs(), max(1, math.floor(full.numel() * fraction)))
        return (mask if positions is None else mask[positions]).view_as(exp_avg)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = run_closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                adam = (m / (1.0 - b1 ** t)) / ((v / (1.0 - b2 ** t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"] != 0.0:
                    adam.add_(p.float(), alpha=group["weight_decay"])
                update = torch.where(self._mask(p, m, group["fraction"]), adam, 0.0)
                decoupled_update_([p], [update], group["lr"], 0.0)
        return loss
