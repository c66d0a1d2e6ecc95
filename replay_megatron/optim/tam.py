"""TAM, torque-aware momentum (Malviya et al. 2024), as SPEC.md section 4 defines the baseline.

Per tensor: `s = cos(m_{t-1}, g)` (0 when either is zero), `sh = gamma*sh + (1-gamma)*s`,
`d = (1+sh)/2`, `m = momentum*m + (eps+d)*g`, `theta *= 1 - lr*weight_decay`, `theta -= lr*m`.
`cos_update=True` is the paper's ablation variant: the update is multiplied by this step's `s`
(`theta -= lr*s*m`). The cosine is of the logical tensor: `layout` (`tensor_layout.TensorLayout`) sums
each held piece's [<m,g>, |m|^2, |g|^2] into its logical tensor's (float64, over TP and DP shards).
State is fp32 and keyed like torch's Adam, which megatron-core's optimizer checkpointing (the
distributed optimizer's included) saves and reshards: `exp_avg` is the momentum, `exp_avg_sq` holds
`sh` in every element of the tensor (a shard of one tensor always carries its tensor's value), `step`.
Nothing synchronises with the host.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from replay_megatron.optim.elementwise import decoupled_update_, run_closure
from replay_megatron.optim.mofo import init_adam_state
from replay_megatron.optim.tensor_layout import TensorLayout


def tensor_cosines(ms: list[Tensor], gs: list[Tensor], slots: list[int], layout: TensorLayout) -> Tensor:
    """cos(m, g) of each piece's logical tensor (0 where a norm is zero), float64, one reduction for all."""
    device = gs[0].device if gs else torch.device("cpu")
    rows = torch.zeros(len(layout.slots), 3, dtype=torch.float64, device=device)
    for m, g, slot in zip(ms, gs, slots):
        m, g = m.reshape(-1), g.reshape(-1)
        rows[slot] += torch.stack([torch.dot(m, g), torch.dot(m, m), torch.dot(g, g)]).double()
    rows = layout.reduce_sums(rows)  # collective: every rank calls it
    denom = (rows[:, 1] * rows[:, 2]).sqrt()
    cos = torch.where(denom > 0, rows[:, 0] / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return cos[torch.tensor(slots, dtype=torch.int64, device=device)]


class TAM(torch.optim.Optimizer):
    """Torque-aware momentum SGD (SPEC.md section 4), with the paper's `cos_update` variant.

    `layout`: None = every parameter is a whole tensor on this rank (`TensorLayout.of_params`).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9, gamma: float = 0.9,
                 eps: float = 1e-8, weight_decay: float = 0.0, cos_update: bool = False,
                 layout: Optional[TensorLayout] = None) -> None:
        if lr < 0 or weight_decay < 0 or eps < 0:
            raise ValueError(f"TAM: lr, weight_decay and eps must be >= 0, got {lr}, {weight_decay}, {eps}")
        if not (0.0 <= momentum < 1.0 and 0.0 <= gamma < 1.0):
            raise ValueError(f"TAM: momentum and gamma must be in [0, 1), got {momentum}, {gamma}")
        self.cos_update = cos_update
        super().__init__(params, dict(lr=lr, momentum=momentum, gamma=gamma, eps=eps, weight_decay=weight_decay))
        self.layout = layout or TensorLayout.of_params(p for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = run_closure(closure)
        init_adam_state(self)
        work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        gs = [p.grad.float() for _, p in work]
        cos = tensor_cosines([self.state[p]["exp_avg"] for _, p in work], gs,
                             [self.layout.slot(p)[1] for _, p in work], self.layout).float()
        for (group, p), g, s in zip(work, gs, cos):
            state = self.state[p]
            state["step"] = state["step"] + 1.0
            m, sh = state["exp_avg"], state["exp_avg_sq"]
            sh.mul_(group["gamma"]).add_(s, alpha=1.0 - group["gamma"])
            damping = (sh + 1.0).div_(2.0).add_(group["eps"])
            m.mul_(group["momentum"]).addcmul_(g, damping)
            update = m * s if self.cos_update else m
            decoupled_update_([p], [update], group["lr"], group["lr"] * group["weight_decay"])
        return loss
