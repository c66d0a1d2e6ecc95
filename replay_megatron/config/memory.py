"""Memory per device of Stage 1 (training) and Stage 0 (collection), and the size of a replay store.

Estimates for one rank, in bytes; every term is a documented formula, not a measurement:

- weights: params x bytes(params_dtype).
- grads: params x 4 (megatron DDP accumulates fp32 main grads).
- optimizer: fp32 states per param (2 for Adam-like m, v; 1 for TAM's m and Muon's momentum on 2-D
  matrices) + fp32 main params (4 bytes) when params_dtype is not fp32; divided by DP with the distributed
  optimizer.
- activations (no recomputation, flash attention: no s x s scores stored) per layer and micro-batch of
  b samples of s tokens, in the activation dtype (= params_dtype), with `sp` = TP under sequence
  parallelism else 1:
  `s*b*(4*H/sp + ((a+g)*d + (a+2g)*d + a*d + 3*F)/TP)` elements (norm inputs/outputs and residuals;
  q/k before the qk-norm; q/k/v into attention; attention output; SwiGLU gate, up and product)
  + `s*b*a/TP` fp32 softmax statistics.
  1F1B keeps `min(PP - stage, micro-batches per step)` micro-batches in flight on a stage.
  The last stage adds the final norm (`2*s*b*H/sp` elements) and the loss logits with one fp32 working
  copy: `s*b*(V_padded/TP)` elements for the full loss, `s*b*(K_max+1)` for the replay loss (|S_t| per
  position, every position stored: an upper bound).
- Stage 0 holds the weights, one layer's activations and the fp32 logits of a micro-batch
  (`s*b*V_padded/TP` x (act + 4) bytes) plus the `TP*K_max` exchanged candidates (ids and values).
"""
from __future__ import annotations

from dataclasses import dataclass

from replay_megatron.config.model_shape import ModelShape
from replay_megatron.config.params import Layout, rank_params
from replay_megatron.config.schema import ReplayConfig
from replay_megatron.optim.registry import optimizer_spec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# What one stored position of a replay store holds besides candidates: K_t, covered mass, position (4 B each).
STORE_POSITION_OVERHEAD = 12
STORE_LSE_BYTES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device, by kind."""

    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def layer_activation_bytes(cfg: ReplayConfig, shape: ModelShape, tp: int, micro_batch: int) -> int:
    """Activations one layer keeps for backward, for one micro-batch (module docstring formula)."""
    s, b, h, d = cfg.data.seq_length, micro_batch, shape.hidden_size, shape.head_dim
    a, g, f = shape.num_heads, shape.num_kv_heads, shape.ffn_hidden_size
    sp = tp if cfg.parallel.sequence_parallel else 1
    elements = s * b * (4 * h // sp + ((a + g) * d + (a + 2 * g) * d + a * d + 3 * f) // tp)
    return elements * DTYPE_BYTES[cfg.model.params_dtype] + s * b * a // tp * 4


def loss_activation_bytes(cfg: ReplayConfig, shape: ModelShape, layout: Layout, micro_batch: int) -> int:
    """Last-stage extras for one micro-batch: the final norm and the loss logits (+ an fp32 copy)."""
    s, b, act = cfg.data.seq_length, micro_batch, DTYPE_BYTES[cfg.model.params_dtype]
    sp = layout.tp if cfg.parallel.sequence_parallel else 1
    per_position = layout.padded_vocab // layout.tp if cfg.train.loss == "full" else cfg.collect.k_max + 1
    return 2 * s * b * shape.hidden_size // sp * act + s * b * per_position * (act + 4)


def train_memory(cfg: ReplayConfig, shape: ModelShape, layout: Layout, stage: int) -> MemoryEstimate:
    """Stage 1 memory of one rank of PP `stage`."""
    p = rank_params(shape, layout, stage)
    dtype = cfg.model.params_dtype
    on_matrices, on_rest = optimizer_spec(cfg.optimizer.name).states
    main_params = 0 if dtype == "fp32" else 4 * p.total
    optimizer = 4 * (on_matrices * p.matrices + on_rest * (p.total - p.matrices)) + main_params
    if cfg.parallel.distributed_optimizer:
        optimizer = -(-optimizer // layout.dp)
    mb = cfg.train.micro_batch_size
    micro_batches = cfg.train.global_batch_size // (mb * layout.dp)
    in_flight = min(layout.pp - stage, max(micro_batches, 1))
    per_micro = len(layout.stage_layers[stage]) * layer_activation_bytes(cfg, shape, layout.tp, mb)
    if stage == layout.pp - 1:
        per_micro += loss_activation_bytes(cfg, shape, layout, mb)
    return MemoryEstimate(weights=p.total * DTYPE_BYTES[dtype], grads=4 * p.total, optimizer=optimizer,
                          activations=in_flight * per_micro)


def collect_memory(cfg: ReplayConfig, shape: ModelShape, layout: Layout, stage: int) -> MemoryEstimate:
    """Stage 0 memory of one rank of PP `stage` (forward only: no grads, no optimizer state)."""
    p = rank_params(shape, layout, stage)
    act = DTYPE_BYTES[cfg.model.params_dtype]
    s, b = cfg.data.seq_length, cfg.collect.micro_batch_size
    working = layer_activation_bytes(cfg, shape, layout.tp, b)
    if stage == layout.pp - 1:
        working += s * b * (layout.padded_vocab // layout.tp) * (act + 4)
        working += s * b * layout.tp * cfg.collect.k_max * 8
    return MemoryEstimate(weights=p.total * act, grads=0, optimizer=0, activations=working)


def store_bytes_per_position(cfg: ReplayConfig, candidates: int | None = None) -> int:
    """Bytes one stored position takes: int32 ids of `candidates` (default K_max+1) + optional logits + LSE."""
    n = cfg.collect.k_max + 1 if candidates is None else candidates
    logits = 0 if cfg.collect.store_logits == "none" else n * DTYPE_BYTES[cfg.collect.store_logits] + STORE_LSE_BYTES
    return n * 4 + logits + STORE_POSITION_OVERHEAD


def full_logits_bytes_per_position(shape: ModelShape) -> int:
    """Bytes of one position's full fp16 logits: the reference of 'storage as a fraction of full logits'."""
    return 2 * shape.vocab_size
