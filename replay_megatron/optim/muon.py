"""AdaMuon (Si et al. 2025) and Muon on megatron-core's own Muon (SPEC.md section 4).

`build_muon_optimizer` is megatron-core's `get_megatron_muon_optimizer`: it puts the 2-D transformer
weights in a tensor-parallel Muon, embeddings, the output layer and 1-D tensors in AdamW, wraps each in
megatron's fp32 or mixed-precision wrapper and chains them. Its TensorParallelMuon is swapped for
`MegatronMuon`, a subclass that keeps megatron's `orthogonalize` (the QKV split and the TP group of each
weight) and emerging-optimizers' tensor-parallel Newton-Schulz, and adds AdaMuon's step:

    M = mu*M + (1-mu)*G;  O = NS(sign(M));  V = b2*V + (1-b2)*O*O;  U = O / (sqrt(V) + eps)
    W = W*(1 - lr*wd) - lr * 0.2*sqrt(rows*cols)/|U|_F * U

(the sign makes M's scale irrelevant, so the EMA and the paper's sum give the same update; the last
factor matches Adam's update RMS). With `adaptive=False` the step is megatron's Muon: `W -= lr * NS(M)`
scaled by its `scale_mode`. Orthogonalisation gathers each TP-sharded matrix (`duplicated` mode), so the
update does not depend on TP; `|U|_F` of a sharded weight is summed over its TP group.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from replay_megatron.mcore_compat import megatron_muon, muon_optimizer_class, newton_schulz_tp
from replay_megatron.optim.attention_clip import AttentionClippedOptimizer, AttentionGradClip

MEGATRON_MUON = megatron_muon()  # first: it makes emerging-optimizers importable, or says what is missing
from emerging_optimizers.orthogonalized_optimizers.muon import get_muon_scale_factor  # noqa: E402
from emerging_optimizers.utils import fp32_matmul_precision  # noqa: E402

# AdaMuon's RMS target: the update RMS of Adam (Si et al. 2025, RMS-aligned rescaling).
ADAMUON_RMS = 0.2


class MegatronMuon(MEGATRON_MUON.TensorParallelMuon):
    """megatron-core's TensorParallelMuon with its arguments, stepping Muon or (`adaptive`) AdaMuon.

    The constructor is written here rather than inherited: megatron-core 0.16's passes emerging-optimizers
    0.1's argument names (`use_nesterov`, NS `mode`), which later releases renamed.
    """

    def __init__(self, params: Any, lr: float = 3e-4, momentum_beta: float = 0.95, use_nesterov: bool = False,
                 weight_decay: float = 0.01, use_decoupled_weight_decay: bool = True, split_qkv: bool = False,
                 is_qkv_fn: Optional[Callable[[torch.Tensor], bool]] = None,
                 qkv_split_shapes: Optional[tuple[int, int, int]] = None, fp32_matmul_prec: str = "medium",
                 coefficient_type: str = "quintic", num_ns_steps: int = 5, scale_mode: str = "spectral",
                 extra_scale_factor: float = 1.0, pg_collection: Any = None, mode: str = "duplicated", *,
                 adaptive: bool = False, beta2: float = 0.999, eps: float = 1e-8) -> None:
        if not use_decoupled_weight_decay:
            raise ValueError("MegatronMuon's weight decay is decoupled: set use_decoupled_weight_decay=True")
        if mode == "blockwise":
            raise ValueError("muon_tp_mode 'blockwise' orthogonalises each TP shard on its own, so the update "
                             "would depend on TP: use 'duplicated' or 'distributed'")
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, momentum=momentum_beta, weight_decay=weight_decay,
                                                          beta2=beta2, eps=eps))
        self.nesterov, self.fp32_matmul_prec, self.adaptive = use_nesterov, fp32_matmul_prec, adaptive
        self.pg_collection, self.mode = pg_collection, mode
        self.split_qkv, self.is_qkv_fn, self.qkv_split_shapes = split_qkv, is_qkv_fn, qkv_split_shapes

        def orthogonalize_fn(grad: torch.Tensor, tp_group: Any, partition_dim: Optional[int] = None) -> torch.Tensor:
            orth = newton_schulz_tp(grad, steps=num_ns_steps, coefficient_type=coefficient_type, tp_group=tp_group,
                                    partition_dim=partition_dim, tp_mode=mode)
            if adaptive:  # AdaMuon scales after its second moment
                return orth
            rows, cols = _logical_shape(grad, tp_group, partition_dim)
            return orth * get_muon_scale_factor(rows, cols, mode=scale_mode) * extra_scale_factor

        self.scaled_orthogonalize_fn = orthogonalize_fn  # what megatron's `orthogonalize` calls

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """megatron's, except for a TP-sharded gated fc1: each shard is [gate_r; up_r], so the gathered
        matrix would be a row permutation of the logical [gate; up]. The rows are put in logical order
        before Newton-Schulz, so its arithmetic (and AdaMuon's round-off-sensitive second moment) is
        the same at every TP size."""
        group, partition_dim = self._tensor_parallel(p)
        if not getattr(p, "is_gated_fc1", False) or group is None or partition_dim != 0:
            return super().orthogonalize(p, grad, **kwargs)
        shards = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, grad.contiguous(), group=group)
        halves = [shard.chunk(2) for shard in shards]
        logical = torch.cat([gate for gate, _ in halves] + [up for _, up in halves])
        gate, up = self.scaled_orthogonalize_fn(logical, None, None).chunk(2)
        rank = dist.get_rank(group)
        return torch.cat([gate.chunk(len(shards))[rank], up.chunk(len(shards))[rank]])

    def init_state(self, param: torch.Tensor) -> None:
        """Zero momentum (and AdaMuon's second moment) for `param`, as its first step would create them."""
        state = self.state[param]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(param)
            if self.adaptive:
                state["moment2_buffer"] = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("closure is not supported")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.init_state(p)
                momentum = self.state[p]["momentum_buffer"]
                momentum.lerp_(p.grad, 1 - group["momentum"])
                direction = p.grad.lerp(momentum, group["momentum"]) if self.nesterov else momentum
                with fp32_matmul_precision(self.fp32_matmul_prec):
                    update = self.orthogonalize(p, direction.sign() if self.adaptive else direction)
                if self.adaptive:
                    update = self._adaptive_update(p, update, group)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])

    def _adaptive_update(self, p: torch.Tensor, orth: torch.Tensor, group: dict) -> torch.Tensor:
        """AdaMuon: the orthogonalised direction over the root of its running second moment, RMS-matched."""
        moment2 = self.state[p]["moment2_buffer"]
        moment2.mul_(group["beta2"]).addcmul_(orth, orth, value=1 - group["beta2"])
        update = orth / (moment2.sqrt() + group["eps"])
        squares = update.square().sum()
        group_of_shards, partition_dim = self._tensor_parallel(p)
        if group_of_shards is not None:
            dist.all_reduce(squares, group=group_of_shards)
        rows, cols = _logical_shape(update, group_of_shards, partition_dim)
        return update * (ADAMUON_RMS * math.sqrt(rows * cols) / squares.sqrt().clamp_min(group["eps"]))

    def _tensor_parallel(self, p: torch.Tensor) -> tuple[Any, Optional[int]]:
        """The TP group and partition dim `orthogonalize` gathers `p` over (None, None: not sharded)."""
        partition_dim = getattr(p, "partition_dim", -1)
        if self.pg_collection is None or not getattr(p, "tensor_model_parallel", False) or partition_dim == -1:
            return None, None
        tp = self.pg_collection.expt_tp if getattr(p, "expert_tp", False) else self.pg_collection.tp
        return tp, partition_dim


def _logical_shape(shard: torch.Tensor, tp_group: Any, partition_dim: Optional[int]) -> tuple[int, int]:
    """(rows, cols) of the whole matrix whose TP shard along `partition_dim` is `shard`."""
    size = [shard.size(-2), shard.size(-1)]
    if partition_dim is not None and tp_group is not None:
        size[partition_dim] *= dist.get_world_size(tp_group)
    return size[0], size[1]


def _copy_layout_flags_to_main_params(wrapper: Any) -> None:
    """The mixed-precision wrapper's fp32 main params get megatron's TP attributes but not the flags its
    Muon reads (`is_qkv`) nor `is_gated_fc1`: copied here, so bf16 runs split and order as fp32 runs do."""
    for model_group, main_group in zip(getattr(wrapper, "float16_groups", []),
                                       getattr(wrapper, "fp32_from_float16_groups", [])):
        for param, main_param in zip(model_group, main_group):
            for flag in ("is_qkv", "is_gated_fc1", "expert_tp"):
                if hasattr(param, flag):
                    setattr(main_param, flag, getattr(param, flag))


def init_muon_state(optimizer: torch.optim.Optimizer, config: Any = None) -> None:
    """A megatron wrapper's `init_state_fn` for MegatronMuon: every state tensor, so that megatron's
    checkpointing can allocate and load them."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.init_state(p)


def build_muon_optimizer(config: Any, model_chunks: Sequence[Any], *, adaptive: bool, beta2: float, eps: float,
                         attention_clip_grad: Optional[float] = None) -> Any:
    """megatron-core's Muon optimizer stack (`get_megatron_muon_optimizer`, AdamW beside it) with
    MegatronMuon for the 2-D weights; with `attention_clip_grad`, the chain first clips the attention
    layers' gradient norm (MuonClip as the paper ran it)."""
    if config.use_distributed_optimizer:
        raise ValueError("megatron-core's Muon does not run under the distributed optimizer "
                         "(set parallel.distributed_optimizer: false)")
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            param.is_gated_fc1 = chunk.config.gated_linear_unit and name.endswith("mlp.linear_fc1.weight")
    with muon_optimizer_class(functools.partial(MegatronMuon, adaptive=adaptive, beta2=beta2, eps=eps)):
        optimizer = MEGATRON_MUON.get_megatron_muon_optimizer(config, list(model_chunks))
    for wrapper in optimizer.chained_optimizers:
        if isinstance(getattr(wrapper, "optimizer", None), MegatronMuon):
            wrapper.init_state_fn = init_muon_state
            _copy_layout_flags_to_main_params(wrapper)
    if attention_clip_grad is not None:
        return AttentionClippedOptimizer(optimizer.chained_optimizers,
                                         AttentionGradClip(model_chunks, attention_clip_grad))
    return optimizer
