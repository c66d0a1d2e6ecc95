"""MoFO, momentum-filtered Adam (Chen et al. 2025), as SPEC.md section 4 defines the baseline.

AdamW moments on every element; per tensor, only the `k = max(1, floor(numel*fraction))` entries with
the largest `|m|` receive the update (ties at the threshold go to the lower flat index, never more than
k); tensors with one dimension or fewer (norms, biases) are always updated in full. Unselected entries
do not change at all: the decoupled weight decay is filtered with the Adam step,
`theta -= lr * mask * (mhat/(sqrt(vhat)+eps) + weight_decay*theta)`.
The selection is over the logical tensor: `layout` (`tensor_layout.TensorLayout`) says which logical
tensor each held tensor (TP shard, distributed-optimizer shard) belongs to, and `top_k.top_k_masks`
selects across ranks without gathering. State is laid out like torch's Adam (`step`, `exp_avg`,
`exp_avg_sq`, fp32), which megatron-core's optimizer checkpointing expects.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

from replay_megatron.optim.elementwise import decoupled_update_, run_closure
from replay_megatron.optim.tensor_layout import TensorLayout
from replay_megatron.optim.top_k import top_k_masks


def init_adam_state(opt: torch.optim.Optimizer, config: object = None) -> None:
    """Empty fp32 `step`, `exp_avg`, `exp_avg_sq` for every parameter without state (megatron's
    `init_state_fn` signature; also what a first step creates)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["step"] = torch.tensor(0.0)
                opt.state[p]["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)


class MoFO(torch.optim.Optimizer):
    """Adam that updates, per tensor, only the top `fraction` of entries by |momentum| (SPEC.md section 4).

    `layout`: None = every parameter is a whole tensor on this rank (`TensorLayout.of_params`).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fraction: float = 0.2,
                 layout: Optional[TensorLayout] = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"MoFO: fraction must be in (0, 1], got {fraction}")
        if lr < 0 or weight_decay < 0 or eps <= 0:
            raise ValueError(f"MoFO: need lr >= 0, weight_decay >= 0, eps > 0, got {lr}, {weight_decay}, {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MoFO: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.fraction = fraction
        self.layout = layout or TensorLayout.of_params(p for g in self.param_groups for p in g["params"])

    def _masks(self, params: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """The update mask of each parameter (None: updated in full), selected together over all slots."""
        slots = self.layout.slots
        k = torch.tensor([max(1, math.floor(s.numel * self.fraction)) if s.dim > 1 else 0 for s in slots],
                         dtype=torch.int64, device=next(p for g in self.param_groups for p in g["params"]).device)
        filtered = [(p, *self.layout.slot(p)) for p in params]
        filtered = [(p, index, offset) for p, slot, index, offset in filtered if slot.dim > 1]
        masks = top_k_masks([self.state[p]["exp_avg"].abs() for p, _, _ in filtered], [i for _, i, _ in filtered],
                            [o for _, _, o in filtered], k, self.layout)  # collective: every rank calls it
        by_param = {p: mask.view_as(p) for (p, _, _), mask in zip(filtered, masks)}
        return [by_param.get(p) for p in params]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = run_closure(closure)
        init_adam_state(self)
        work = []
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state["step"] + 1.0
                g = p.grad.float()
                state["exp_avg"].lerp_(g, 1.0 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
                work.append((group, p))
        for (group, p), mask in zip(work, self._masks([p for _, p in work])):
            state, (b1, b2) = self.state[p], group["betas"]
            t = float(state["step"])
            adam = (state["exp_avg"] / (1.0 - b1 ** t)) / (
                (state["exp_avg_sq"] / (1.0 - b2 ** t)).sqrt_().add_(group["eps"]))
            if group["weight_decay"] != 0.0:
                adam.add_(p.float(), alpha=group["weight_decay"])
            update = adam if mask is None else torch.where(mask, adam, 0.0)
            decoupled_update_([p], [update], group["lr"], 0.0)
        return loss
