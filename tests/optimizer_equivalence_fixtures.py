"""Shared runs of the optimizer equivalence tests: a tiny Qwen3 trained in megatron's optimizer stack
(optim.megatron.build_optimizer) from the same weights, in one process or at TP x PP x DP, end to end or
on the one-process run's recorded gradients; compared parameter by parameter (train_fixtures)."""
from __future__ import annotations

import os
from typing import Callable, Optional

from train_fixtures import main_grads_to_hf, param_differences, set_main_grads_from_hf

TOL = 1e-5


def model_and_optimizer(hf, hf_sd, layout, kwargs: dict, distributed_optimizer: bool):
    """This rank's stage in megatron DDP, loaded from the HF weights, and megatron's optimizer built from
    `kwargs` (build_optimizer's arguments; weight decay 0.1 and grad-norm clip 1.0 unless given)."""
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.optim.megatron import build_optimizer
    from replay_megatron.training.setup import build_ddp_model

    model = build_ddp_model(hf, layout, distributed_optimizer=distributed_optimizer)
    load_hf_into_model(model.module, hf_sd, hf, tp=layout.tp, tp_rank=layout.tp_rank)
    model.broadcast_params()
    optimizer = build_optimizer(**{"weight_decay": 0.1, "clip_grad": 1.0, **kwargs}, model_chunks=[model],
                                distributed_optimizer=distributed_optimizer)
    return model, optimizer


class GradientRecorder:
    """Megatron's optimizer, recording before each step the gradients it is about to apply (HF names)."""

    def __init__(self, optimizer, stage, hf) -> None:
        self.optimizer, self.stage, self.hf, self.grads = optimizer, stage, hf, []

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def step(self):
        self.grads.append(main_grads_to_hf(self.stage, self.hf))
        return self.optimizer.step()


def train_variants(variants: dict, hf, hf_sd, per_rank_steps, tp: int, pp: int, distributed_optimizer: bool,
                   check_against: Optional[dict] = None, inspect: Optional[Callable] = None) -> dict:
    """Each variant trains from the same weights on this DP rank's micro-batches (megatron's rank order
    puts TP innermost, then PP: the DP rank is RANK // (tp*pp)). Returns, per variant, the HF state dict
    and (`{variant}_grads`) each step's gradients (one process), or the max |param - check_against[variant]|
    and (`{variant}_beyond_tol`) the fraction of entries differing by more than TOL. `inspect(variant,
    model, optimizer, before, kwargs)`, before the last step's parameters, adds its dict to the result."""
    from replay_megatron.models.conversion import model_to_hf
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.step import train_step

    steps = per_rank_steps[int(os.environ.get("RANK", "0")) // (tp * pp)]
    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    out = {}
    for variant, kwargs in variants.items():
        model, optimizer = model_and_optimizer(hf, hf_sd, layout, kwargs, distributed_optimizer)
        if check_against is None:
            optimizer = GradientRecorder(optimizer, model.module, hf)
        before = {}
        for i, micro_batches in enumerate(steps):
            if i == len(steps) - 1:
                before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
            assert train_step(model, optimizer, micro_batches)["update_ok"]
        if inspect is not None:
            out.update(inspect(variant, model, optimizer, before, kwargs))
        if check_against is None:
            out[variant], out[f"{variant}_grads"] = model_to_hf(model.module, hf), optimizer.grads
            continue
        diffs = param_differences(model.module, check_against[variant], hf, layout)
        out[variant] = max(d.max().item() for d in diffs)
        out[f"{variant}_beyond_tol"] = sum(int((d > TOL).sum()) for d in diffs) / sum(d.numel() for d in diffs)
    shutdown()
    return out


def step_on_recorded_gradients(variants: dict, hf, hf_sd, reference: dict, tp: int, pp: int) -> dict:
    """Each variant steps its megatron optimizer (grad-norm clipping included) on the one-process run's
    recorded gradients, this rank's shard of them put into each main_grad in place of a backward pass.
    Returns, per variant, the max |param - reference| over this rank's parameters."""
    from replay_megatron.platform.distributed import initialize, shutdown

    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    out = {}
    for variant, kwargs in variants.items():
        model, optimizer = model_and_optimizer(hf, hf_sd, layout, kwargs, False)
        for grads in reference[f"{variant}_grads"]:
            model.zero_grad_buffer()
            optimizer.zero_grad()
            set_main_grads_from_hf(model.module, grads, hf, layout)
            assert optimizer.step()[0]
        out[variant] = max(d.max().item() for d in param_differences(model.module, reference[variant], hf, layout))
    shutdown()
    return out


def split_over_dp(steps: list, dp: int) -> list:
    """Per DP rank, its micro-batch of each step (step i's micro-batch r goes to DP rank r)."""
    return [[[step[r]] for step in steps] for r in range(dp)]


def changed_fractions(reference_sd: dict, start_sd: dict) -> dict[str, float]:
    """Per HF tensor, the fraction of entries a run changed; asserts that it moved some by more than 1e-3."""
    assert max((reference_sd[k] - start_sd[k]).abs().max().item() for k in reference_sd) > 1e-3
    return {k: (reference_sd[k] != start_sd[k]).float().mean().item() for k in reference_sd}
