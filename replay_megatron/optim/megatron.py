"""MoClip, AdamW and Adam-atan2 inside megatron-core's own optimizer stack (issue 5 item 3, SPEC.md 3).

`build_optimizer` calls megatron-core's `get_megatron_optimizer(optimizer='adam')` while the inner Adam
class it instantiates is replaced by a MoClip subclass (`mcore_compat.inner_adam_class`). Everything
around the inner optimizer is megatron's: param groups (`wd_mult=0` on norms/biases, applied by its
`OptimizerParamScheduler`), gradient-norm clipping, the fp32 / mixed-precision (fp32 main params) /
distributed (state sharded over DP) wrappers and the chaining. Afterwards each MoClip gets:

- `stats_reducer`: one all-reduce over the wrapper's grad-norm group (`get_grad_stats_parallel_group`:
  the model-parallel group, or the whole DP x model-parallel instance with the distributed optimizer);
- `counts_toward_stats`: megatron's grad-norm filter (`stats.counts_toward_global_stats`); megatron
  copies the attributes it reads (`shared`, `tensor_model_parallel`, `partition_dim`) onto its fp32 main
  params and distributed-optimizer shards, and shards of one tensor over DP are disjoint;
- the wrapper's `init_state_fn`: MoClip's fp32 `exp_avg`, `exp_avg_sq` and `step`, so megatron's
  (sharded) optimizer checkpointing can allocate, save and load MoClip's state (allocated at build).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from replay_megatron.mcore_compat import (get_megatron_optimizer, grad_stats_group, inner_adam_class,
                                          load_optimizer_state_dict)
from replay_megatron.optim.moclip import MoClip
from replay_megatron.optim.stats import GlobalSumsReducer, counts_toward_global_stats

OPTIMIZERS = ("moclip", "adamw", "adam-atan2")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def moclip_init_state(opt: torch.optim.Optimizer, config: Any = None) -> None:
    """megatron's `init_state_fn` for MoClip: empty fp32 state for every parameter (before a load)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["step"] = torch.tensor(0.0)
                opt.state[p]["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)


def _moclip_class(**hyper: Any) -> type:
    """A stand-in for megatron's Adam class: MoClip on megatron's param groups with its lr/betas/wd.

    A subclass, not a function: megatron's DistributedOptimizer checks `isinstance(optimizer, Adam)`
    against the (substituted) class names.
    """

    class MegatronMoClip(MoClip):
        def __init__(self, params: Sequence[dict], lr: float, weight_decay: float,
                     betas: tuple[float, float], eps: float = 0.0, adam_w_mode: bool = True,
                     **unsupported: Any) -> None:
            if not adam_w_mode:
                raise ValueError("MoClip's weight decay is decoupled: set decoupled_weight_decay=True")
            if unsupported:
                raise ValueError(f"MoClip does not support megatron optimizer options {sorted(unsupported)} "
                                 "(precision-aware optimizer)")
            super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, **hyper)

    return MegatronMoClip


def _wrappers(optimizer: Any) -> list:
    """The per-optimizer wrappers of a (possibly chained) megatron-core optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def moclip_optimizers(optimizer: Any) -> list[MoClip]:
    """The MoClip instances inside a megatron-core optimizer (for logging `last_stats`)."""
    return [w.optimizer for w in _wrappers(optimizer) if isinstance(getattr(w, "optimizer", None), MoClip)]


def build_optimizer(name: str, model_chunks: Sequence[Any], *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), clip_grad: float = 0.0,
                    params_dtype: str = "fp32", distributed_optimizer: bool = False,
                    max_angle: float = 45.0, atan2_a: float = 1.0, atan2_b: float = 1.0,
                    mode: str = "paper", eps: Optional[float] = None, **config_kwargs: Any) -> Any:
    """megatron-core's optimizer wrappers around MoClip, AdamW or Adam-atan2 (MoClip, max_angle=180).

    `model_chunks`: megatron DDP-wrapped model chunks. `eps`: for AdamW its epsilon (default 1e-8); for
    MoClip None keeps the atan2 update, a number gives Adam's division ("MoClip without atan2").
    `config_kwargs` go to megatron's `OptimizerConfig` as they are (e.g. `min_lr`).
    """
    from megatron.core.optimizer import OptimizerConfig

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {OPTIMIZERS}")
    if params_dtype not in _DTYPES:
        raise ValueError(f"params_dtype {params_dtype!r}: expected one of {sorted(_DTYPES)}")
    config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
        adam_eps=1e-8 if eps is None else eps, clip_grad=clip_grad, bf16=params_dtype == "bf16",
        fp16=params_dtype == "fp16", params_dtype=_DTYPES[params_dtype],
        use_distributed_optimizer=distributed_optimizer, **config_kwargs)
    if name == "adamw":
        return get_megatron_optimizer(config, list(model_chunks))
    angle = 180.0 if name == "adam-atan2" else max_angle
    moclip_class = _moclip_class(max_angle=angle, atan2_a=atan2_a, atan2_b=atan2_b, mode=mode, eps=eps)
    with inner_adam_class(moclip_class):
        optimizer = get_megatron_optimizer(config, list(model_chunks))
    inner = [w for w in _wrappers(optimizer) if getattr(w, "optimizer", None) is not None]
    if len(inner) > 1:  # e.g. expert params in their own optimizer: the angle would no longer be global
        raise NotImplementedError(f"MoClip needs one optimizer over all parameters; megatron-core built "
                                  f"{len(inner)} (expert-parallel parameters are not supported)")
    for wrapper in inner:
        moclip = wrapper.optimizer
        moclip.stats_reducer = GlobalSumsReducer(grad_stats_group(wrapper))
        moclip.counts_toward_stats = counts_toward_global_stats
        wrapper.init_state_fn = moclip_init_state
        # Allocated now (zeros, step 0: what the first step would create), so that a fresh optimizer can
        # load a checkpoint: DistributedOptimizer.sharded_state_dict(is_loading=True) first reads every
        # parameter's `step` through state_dict(), before it would call init_state_fn.
        moclip_init_state(moclip)
    return optimizer


def load_optimizer_state(optimizer: Any, state_dict: dict) -> None:
    """`optimizer.load_state_dict(state_dict)` for a `build_optimizer` result, with the state dict that
    megatron's `dist_checkpointing.load` returned for `optimizer.sharded_state_dict(..., is_loading=True)`.

    Works around two megatron-core 0.16 DistributedOptimizer issues met by a torch-style optimizer (a
    per-parameter `step`, no TE/Apex FusedAdam): the load copies into fp32 main params that are views of
    the model's leaf params (done under no_grad here), and the `dp_reshardable` format copies the
    loading template's `step` (a non-persistent object) over the checkpoint's; the checkpoint's step,
    saved in the param groups, is re-applied to every MoClip parameter. The DistributedOptimizer also
    hands its inner optimizer only `state` and `param_groups`: MoClip's running clip counts, saved
    beside them, are set here.
    """
    with torch.no_grad():
        load_optimizer_state_dict(optimizer, state_dict)
    common = state_dict.get("optimizer", {}) if isinstance(state_dict, dict) else {}
    if common.get("moclip_counts") is not None:
        for moclip in moclip_optimizers(optimizer):
            moclip.clip_counts = common["moclip_counts"]
    groups = common.get("param_groups", [])
    steps = {float(g["step"]) for g in groups if g.get("step") is not None}
    if len(steps) > 1:
        raise ValueError(f"optimizer checkpoint: param groups at different steps {sorted(steps)}")
    for step in steps:
        for moclip in moclip_optimizers(optimizer):
            for state in moclip.state.values():
                state["step"] = torch.tensor(step)
