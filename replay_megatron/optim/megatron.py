"""MoClip, AdamW, Adam-atan2, MoFO and TAM inside megatron-core's own optimizer stack (SPEC.md 3-4);
AdaMuon and MuonClip through megatron-core's Muon stack (`optim.muon`).

`build_optimizer` calls megatron-core's `get_megatron_optimizer(optimizer='adam')` while the inner Adam
class it instantiates is replaced by a MoClip, MoFO or TAM subclass (`mcore_compat.inner_adam_class`).
Everything around the inner optimizer is megatron's: param groups (`wd_mult=0` on norms/biases, applied
by its `OptimizerParamScheduler`), gradient-norm clipping, the fp32 / mixed-precision (fp32 main params)
/ distributed (state sharded over DP) wrappers and the chaining. Afterwards each MoClip gets:

- `stats_reducer`: one all-reduce over the wrapper's grad-norm group (`get_grad_stats_parallel_group`:
  the model-parallel group, or the whole DP x model-parallel instance with the distributed optimizer);
- `counts_toward_stats`: megatron's grad-norm filter (`stats.counts_toward_global_stats`); megatron
  copies the attributes it reads (`shared`, `tensor_model_parallel`, `partition_dim`) onto its fp32 main
  params and distributed-optimizer shards, and shards of one tensor over DP are disjoint;

each MoFO and TAM a `tensor_layout.TensorLayout` of the wrapper (which logical tensor, and where in it,
each TP shard, fp32 copy or DP shard is), for their per-tensor statistics; and every one the wrapper's
`init_state_fn`: fp32 `exp_avg`, `exp_avg_sq` and `step`, so megatron's (sharded) optimizer
checkpointing can allocate, save and load the state (allocated at build).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from replay_megatron.mcore_compat import (get_megatron_optimizer, grad_stats_group, inner_adam_class,
                                          load_optimizer_state_dict)
from replay_megatron.optim.moclip import MoClip
from replay_megatron.optim.mofo import MoFO, init_adam_state
from replay_megatron.optim.tam import TAM
from replay_megatron.optim.tensor_layout import TensorLayout
from replay_megatron.optim.stats import GlobalSumsReducer, counts_toward_global_stats

OPTIMIZERS = ("moclip", "adamw", "adam-atan2", "mofo", "tam", "adamuon", "muonclip")
MUON_OPTIMIZERS = ("adamuon", "muonclip")  # megatron-core's Muon stack (optim.muon)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inner_class(base: type, hyper: Callable[[tuple[float, float], float], dict]) -> type:
    """A stand-in for megatron's Adam class: `base` (MoClip, MoFO, TAM) on megatron's param groups with its
    lr and weight decay; `hyper(betas, eps)` gives the rest of `base`'s arguments.

    A subclass, not a function: megatron's DistributedOptimizer checks `isinstance(optimizer, Adam)`
    against the (substituted) class names.
    """

    class MegatronInner(base):
        def __init__(self, params: Sequence[dict], lr: float, weight_decay: float,
                     betas: tuple[float, float], eps: float = 0.0, adam_w_mode: bool = True,
                     **unsupported: Any) -> None:
            if not adam_w_mode:
                raise ValueError(f"{base.__name__}'s weight decay is decoupled: set decoupled_weight_decay=True")
            if unsupported:
                raise ValueError(f"{base.__name__} does not support megatron optimizer options "
                                 f"{sorted(unsupported)} (precision-aware optimizer)")
            super().__init__(params, lr=lr, weight_decay=weight_decay, **hyper(betas, eps))

    MegatronInner.__name__ = MegatronInner.__qualname__ = f"Megatron{base.__name__}"
    return MegatronInner


def _wrappers(optimizer: Any) -> list:
    """The per-optimizer wrappers of a (possibly chained) megatron-core optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def moclip_optimizers(optimizer: Any) -> list[MoClip]:
    """The MoClip instances inside a megatron-core optimizer (for logging `last_stats`)."""
    return [w.optimizer for w in _wrappers(optimizer) if isinstance(getattr(w, "optimizer", None), MoClip)]


def inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core optimizer (MoClip, MoFO, TAM or torch's AdamW)."""
    return [w.optimizer for w in _wrappers(optimizer) if getattr(w, "optimizer", None) is not None]


def build_optimizer(name: str, model_chunks: Sequence[Any], *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), clip_grad: float = 0.0,
                    params_dtype: str = "fp32", distributed_optimizer: bool = False,
                    max_angle: float = 45.0, atan2_a: float = 1.0, atan2_b: float = 1.0,
                    mode: str = "paper", eps: Optional[float] = None, mofo_fraction: float = 0.2,
                    tam_gamma: float = 0.9, tam_variant: str = "plain", muon_momentum: float = 0.95,
                    attention_clip_grad: float = 1.0, muon_matmul_precision: str = "medium",
                    **config_kwargs: Any) -> Any:
    """megatron-core's optimizer wrappers around MoClip, AdamW, Adam-atan2 (MoClip, max_angle=180), MoFO
    or TAM (`tam_variant` "plain", or "cosine": the update scaled by cos(phi); momentum = betas[0]); or
    megatron-core's Muon stack (`optim.muon`) for AdaMuon (second moment decay betas[1]) and MuonClip
    (Muon with the attention layers' gradient norm clipped to `attention_clip_grad`), AdamW beside them.

    `model_chunks`: megatron DDP-wrapped model chunks. `eps`: for AdamW, MoFO and AdaMuon its epsilon
    (default 1e-8), TAM's damping floor; for MoClip None keeps the atan2 update, a number gives Adam's
    division ("MoClip without atan2"). `muon_matmul_precision`: torch's fp32 matmul precision inside
    Newton-Schulz ("medium": bf16, megatron's default; "highest": fp32). `config_kwargs` go to megatron's
    `OptimizerConfig` as they are (`min_lr`).
    """
    from megatron.core.optimizer import OptimizerConfig

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {OPTIMIZERS}")
    if params_dtype not in _DTYPES:
        raise ValueError(f"params_dtype {params_dtype!r}: expected one of {sorted(_DTYPES)}")
    if tam_variant not in ("plain", "cosine"):
        raise ValueError(f"tam_variant {tam_variant!r}: expected 'plain' or 'cosine'")
    config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
        adam_eps=1e-8 if eps is None else eps, clip_grad=clip_grad, bf16=params_dtype == "bf16",
        fp16=params_dtype == "fp16", params_dtype=_DTYPES[params_dtype],
        use_distributed_optimizer=distributed_optimizer, **config_kwargs)
    if name in MUON_OPTIMIZERS:
        from replay_megatron.optim.muon import build_muon_optimizer

        # OptimizerConfig's Muon fields (0.16; on 0.12, which has no Muon, build_muon_optimizer refuses)
        for field, value in dict(muon_momentum=muon_momentum, muon_fp32_matmul_prec=muon_matmul_precision,
                                 muon_tp_mode="duplicated", muon_use_nesterov=False).items():
            setattr(config, field, value)
        return build_muon_optimizer(config, model_chunks, adaptive=name == "adamuon", beta2=betas[1],
                                    eps=1e-8 if eps is None else eps,
                                    attention_clip_grad=attention_clip_grad if name == "muonclip" else None)
    if name == "adamw":
        return get_megatron_optimizer(config, list(model_chunks))
    inner_classes = {
        "moclip": lambda: _inner_class(MoClip, lambda b, e: dict(
            betas=b, max_angle=max_angle, atan2_a=atan2_a, atan2_b=atan2_b, mode=mode, eps=eps)),
        "adam-atan2": lambda: _inner_class(MoClip, lambda b, e: dict(
            betas=b, max_angle=180.0, atan2_a=atan2_a, atan2_b=atan2_b, mode=mode, eps=eps)),
        "mofo": lambda: _inner_class(MoFO, lambda b, e: dict(betas=b, eps=e, fraction=mofo_fraction)),
        "tam": lambda: _inner_class(TAM, lambda b, e: dict(momentum=b[0], eps=e, gamma=tam_gamma,
                                                            cos_update=tam_variant == "cosine")),
    }
    with inner_adam_class(inner_classes[name]()):
        optimizer = get_megatron_optimizer(config, list(model_chunks))
    inner = [w for w in _wrappers(optimizer) if getattr(w, "optimizer", None) is not None]
    if len(inner) > 1:  # e.g. expert params in their own optimizer: statistics would no longer be global
        raise NotImplementedError(f"{name} needs one optimizer over all parameters; megatron-core built "
                                  f"{len(inner)} (expert-parallel parameters are not supported)")
    for wrapper in inner:
        opt = wrapper.optimizer
        if isinstance(opt, MoClip):
            opt.stats_reducer = GlobalSumsReducer(grad_stats_group(wrapper))
            opt.counts_toward_stats = counts_toward_global_stats
        else:
            opt.layout = TensorLayout.of_megatron(wrapper, model_chunks)
        wrapper.init_state_fn = init_adam_state
        # Allocated now (zeros, step 0: what the first step would create), so that a fresh optimizer can
        # load a checkpoint: DistributedOptimizer.sharded_state_dict(is_loading=True) first reads every
        # parameter's `step` through state_dict(), before it would call init_state_fn.
        init_adam_state(opt)
    return optimizer


def load_optimizer_state(optimizer: Any, state_dict: dict) -> None:
    """`optimizer.load_state_dict(state_dict)` for a `build_optimizer` result, with the state dict that
    megatron's `dist_checkpointing.load` returned for `optimizer.sharded_state_dict(..., is_loading=True)`.

    Works around two megatron-core 0.16 DistributedOptimizer issues met by a torch-style optimizer (a
    per-parameter `step`, no TE/Apex FusedAdam): the load copies into fp32 main params that are views of
    the model's leaf params (done under no_grad here), and the `dp_reshardable` format copies the
    loading template's `step` (a non-persistent object) over the checkpoint's; the checkpoint's step,
    saved in the param groups, is re-applied to every parameter. The DistributedOptimizer also
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
        for inner in inner_optimizers(optimizer):
            for state in inner.state.values():
                if "exp_avg" in state:  # Adam-style states (Muon's momentum takes no step count)
                    state["step"] = torch.tensor(step)
