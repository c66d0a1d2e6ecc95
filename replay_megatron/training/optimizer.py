"""The run's optimizer and learning-rate schedule from its config: megatron-core's optimizer stack around
the registry's optimizer (`optim.registry`), and megatron's OptimizerParamScheduler in optimizer steps."""
from __future__ import annotations

from typing import Any

from replay_megatron.optim.megatron import build_optimizer, moclip_optimizers
from replay_megatron.optim.moclip import MoClip
from replay_megatron.optim.registry import optimizer_spec


def build_configured_optimizer(cfg, model) -> Any:
    """megatron's optimizer wrappers around `optimizer.name` for the DDP-wrapped `model`."""
    o = cfg.optimizer
    spec = optimizer_spec(o.name)
    return build_optimizer(spec.builder, [model], lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                           clip_grad=o.clip_grad, params_dtype=cfg.model.params_dtype,
                           distributed_optimizer=cfg.parallel.distributed_optimizer, max_angle=o.max_angle,
                           atan2_a=o.atan2_a, atan2_b=o.atan2_b, mode=o.clip_mode,
                           eps=o.eps if "eps" in spec.fields else None, mofo_fraction=o.mofo_fraction,
                           tam_gamma=o.tam_gamma, tam_variant=o.tam_variant, muon_momentum=o.muon_momentum,
                           attention_clip_grad=o.attention_clip_grad, min_lr=o.min_lr)


def build_scheduler(cfg, optimizer, steps: int) -> Any:
    """megatron-core's OptimizerParamScheduler in optimizer steps (warm-up, decay to min_lr, constant wd)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(steps, o.warmup_iters + 1),
        lr_decay_style=o.lr_schedule, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1), wd_incr_style="constant")


def moclip_of(optimizer) -> MoClip | None:
    """The MoClip inside a megatron optimizer (for its per-step statistics), or None for other optimizers."""
    found = moclip_optimizers(optimizer)
    return found[0] if found else None
