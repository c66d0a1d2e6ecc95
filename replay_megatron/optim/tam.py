"""TAM, torque-aware momentum (Malviya et al. 2024), as SPEC.md section 4 defines the baseline.

Per tensor: `s = cos(m_{t-1}, g)` (0 when either is zero), `sh = gamma*sh + (1-gamma)*s`,
`d = (1+sh)/2`, `m = momentum*m + (eps+d)*g`, `theta *= 1 - lr*weight_decay`, `theta -= lr*m`.
`cos_update=True` is the paper's ablation variant: the update is multiplied by this step's `s`
(`theta -= lr*s*m`). The cosine is of the logical tensor: `tensor_sums` (e.g.
`stats.TensorParallelSums`) turns each shard's local sums into the full tensor's before `s` is formed.
State is fp32 (`momentum_buffer`, `sh`); nothing synchronises with the host.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from replay_megatron.optim.elementwise import decoupled_update_, run_closure
from replay_megatron.optim.stats import TensorSumsReducer


def tensor_cosines(ms: list[Tensor], gs: list[Tensor], params: list[Tensor],
                   tensor_sums: Optional[TensorSumsReducer]) -> Tensor:
    """cos(m_i, g_i) per tensor (0 where a norm is zero), from [<m,g>, |m|^2, |g|^2] rows (float64)."""
    rows = torch.stack([torch.stack([torch.dot(m.reshape(-1), g.reshape(-1)), m.square().sum(), g.square().sum()])
                        for m, g in zip(ms, gs)]).double()
    if tensor_sums is not None:
        rows = tensor_sums(params, rows)
    denom = (rows[:, 1] * rows[:, 2]).sqrt()
    return torch.where(denom > 0, rows[:, 0] / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


class TAM(torch.optim.Optimizer):
    """Torque-aware momentum SGD (SPEC.md section 4), with the paper's `cos_update` variant."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9, gamma: float = 0.9,
                 eps: float = 1e-8, weight_decay: float = 0.0, cos_update: bool = False,
                 tensor_sums: Optional[TensorSumsReducer] = None) -> None:
        if lr < 0 or weight_decay < 0 or eps < 0:
            raise ValueError(f"TAM: lr, weight_decay and eps must be >= 0, got {lr}, {weight_decay}, {eps}")
        if not (0.0 <= momentum < 1.0 and 0.0 <= gamma < 1.0):
            raise ValueError(f"TAM: momentum and gamma must be in [0, 1), got {momentum}, {gamma}")
        self.cos_update = cos_update
        self.tensor_sums = tensor_sums
        super().__init__(params, dict(lr=lr, momentum=momentum, gamma=gamma, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = run_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                    self.state[p]["sh"] = torch.zeros((), dtype=torch.float32, device=p.device)
            ms = [self.state[p]["momentum_buffer"] for p in params]
            gs = [p.grad.float() for p in params]
            cos = tensor_cosines(ms, gs, params, self.tensor_sums).float()
            for i, p in enumerate(params):
                state = self.state[p]
                state["sh"].mul_(group["gamma"]).add_(cos[i], alpha=1.0 - group["gamma"])
                damping = group["eps"] + (1.0 + state["sh"]) / 2.0
                ms[i].mul_(group["momentum"]).addcmul_(gs[i], damping)
                update = ms[i] * cos[i] if self.cos_update else ms[i]
                decoupled_update_([p], [update], group["lr"], group["lr"] * group["weight_decay"])
        return loss
