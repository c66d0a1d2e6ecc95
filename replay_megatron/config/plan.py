"""`plan`: a config's parallel layout, parameter counts, memory per device and replay store size, as text.

Pure arithmetic on the config and the model shape (params.py, memory.py): no devices, no torch, no megatron.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from replay_megatron.config.checks import world_and_dp
from replay_megatron.config.loader import validate_config
from replay_megatron.config.memory import (MemoryEstimate, collect_memory, full_logits_bytes_per_position,
                                           store_bytes_per_position, train_memory)
from replay_megatron.config.model_shape import ModelShape, model_shape
from replay_megatron.config.params import Layout, ParamCounts, make_layout, model_params, rank_params
from replay_megatron.config.schema import ReplayConfig
from replay_megatron.optim.registry import OPTIMIZERS

GIB = 1 << 30
PAPER_MEDIAN_CANDIDATES = 101  # paper: median |S_t| about 100, plus the gold token


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: its parameters per TP rank and its memory in Stage 1 and Stage 0."""

    stage: int
    params: ParamCounts
    train: MemoryEstimate
    collect: MemoryEstimate


@dataclass(frozen=True)
class Plan:
    """Everything `replay-megatron plan` prints, as numbers."""

    cfg: ReplayConfig
    shape: ModelShape
    layout: Layout
    total: ParamCounts
    stages: tuple[StagePlan, ...]
    device_memory: int

    @property
    def train_peak(self) -> int:
        return max(s.train.total for s in self.stages)

    @property
    def collect_peak(self) -> int:
        return max(s.collect.total for s in self.stages)

    def fits(self, which: str = "all") -> bool:
        """Whether the peak of Stage 1 (`train`), Stage 0 (`collect`) or both (`all`) fits the device."""
        peaks = {"train": [self.train_peak], "collect": [self.collect_peak],
                 "all": [self.train_peak, self.collect_peak]}[which]
        return max(peaks) <= self.device_memory


def make_plan(cfg: ReplayConfig, world_size: int | None = None, device_memory_gib: float = 64.0) -> Plan:
    """The plan of a config at `world_size` ranks (None: TP x PP) on devices of `device_memory_gib`.

    Raises ConfigError when the config does not fit that world size (TP/PP/batch divisibility).
    """
    validate_config(cfg, world_size)
    shape = model_shape(cfg)
    _, dp = world_and_dp(cfg, world_size)
    p = cfg.parallel
    layout = make_layout(shape, p.tensor_model_parallel_size, p.pipeline_model_parallel_size, dp,
                         cfg.model.make_vocab_size_divisible_by)
    stages = tuple(StagePlan(s, rank_params(shape, layout, s), train_memory(cfg, shape, layout, s),
                             collect_memory(cfg, shape, layout, s)) for s in range(layout.pp))
    return Plan(cfg, shape, layout, model_params(shape), stages, int(device_memory_gib * GIB))


def train_data_counts(cfg: ReplayConfig) -> tuple[int, int] | None:
    """(loss-bearing tokens, samples) of `data.train` from its token store's meta.json, None if not there."""
    path = cfg.input_path(cfg.data.train)
    try:
        meta = json.loads((path / "meta.json").read_text()) if path is not None else None
        return (int(meta["num_loss_tokens"]), int(meta["num_samples"])) if meta else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_plan(plan: Plan, which: str = "all", train_data: tuple[int, int] | None = None) -> str:
    """The human-readable plan; `which` is all | train | collect; `train_data` = (loss-bearing tokens,
    samples) of the training set sizes the whole replay store."""
    lines = _model_lines(plan) + _layout_lines(plan) + _param_lines(plan)
    if which in ("all", "train"):
        lines += _train_lines(plan)
    if which in ("all", "collect"):
        lines += _collect_lines(plan, train_data)
    peak = max(plan.train_peak if which != "collect" else 0, plan.collect_peak if which != "train" else 0)
    verdict = "OK" if plan.fits(which) else "OVER"
    lines.append(f"verdict: {verdict} (peak {_gib(peak)} of {_gib(plan.device_memory)} per device)")
    return "\n".join(lines)


def _model_lines(plan: Plan) -> list[str]:
    s, m = plan.shape, plan.cfg.model
    source = f"preset {m.preset}" if m.preset else f"HF {m.hf_path}"
    tied = "tied" if s.tied_embeddings else "untied"
    return [f"model: {source}: hidden {s.hidden_size}, {s.num_layers} layers, {s.num_heads} heads / "
            f"{s.num_kv_heads} KV heads (head_dim {s.head_dim}), ffn {s.ffn_hidden_size}, vocab {s.vocab_size}, "
            f"{tied} embeddings, {m.params_dtype}"]


def _layout_lines(plan: Plan) -> list[str]:
    lay, p, s = plan.layout, plan.cfg.parallel, plan.shape
    out = [f"layout: world {lay.world} = TP {lay.tp} x PP {lay.pp} x DP {lay.dp}; sequence parallel "
           f"{'on' if p.sequence_parallel else 'off'}; distributed optimizer "
           f"{'on' if p.distributed_optimizer else 'off'}",
           f"  vocab {s.vocab_size} padded to {lay.padded_vocab} (multiple of "
           f"{plan.cfg.model.make_vocab_size_divisible_by * lay.tp}): {lay.padded_vocab // lay.tp} rows per TP rank"]
    for stage, layers in enumerate(lay.stage_layers):
        parts = [f"layers {layers.start}-{layers.stop - 1} ({len(layers)})"]
        if stage == 0:
            parts.insert(0, "embedding")
        if stage == lay.pp - 1:
            parts.append("final norm")
            if not s.tied_embeddings:
                parts.append("output layer")
            elif lay.pp > 1:
                parts.append("output layer (copy of the tied embedding)")
            else:
                parts.append("output layer = the tied embedding")
        out.append(f"  PP stage {stage}: {', '.join(parts)}")
    return out


def _param_lines(plan: Plan) -> list[str]:
    t = plan.total
    out = [f"parameters: total {t.total:,} = embedding {t.embedding:,} + output {t.output:,} + transformer "
           f"{t.transformer:,}"]
    for sp in plan.stages:
        r = sp.params
        out.append(f"  per TP rank, PP stage {sp.stage}: {r.total:,} (embedding {r.embedding:,}, output "
                   f"{r.output:,}, matrices {r.matrices:,}, norms {r.norms:,})")
    return out


def _train_lines(plan: Plan) -> list[str]:
    c = plan.cfg
    mb = c.train.micro_batch_size
    n_micro = c.train.global_batch_size // (mb * plan.layout.dp)
    out = [f"Stage 1 (train): loss {c.train.loss}, optimizer {c.optimizer.name}, global batch "
           f"{c.train.global_batch_size} = {n_micro} micro-batches of {mb} x {c.data.seq_length} tokens x DP "
           f"{plan.layout.dp}"]
    if OPTIMIZERS[c.optimizer.name].muon:
        out.append(f"  note: {c.optimizer.name!r} runs on megatron-core's Muon: `train` needs megatron-core >= 0.16 "
                   "and the emerging-optimizers package (README: Muon baselines)")
    out += [_memory_line(sp.stage, sp.train, plan.device_memory) for sp in plan.stages]
    return out


def _collect_lines(plan: Plan, train_data: tuple[int, int] | None) -> list[str]:
    c = plan.cfg.collect
    out = [f"Stage 0 (collect): tau {c.tau}, K_max {c.k_max}, positions {c.positions.strategy} "
           f"(amount {c.positions.amount}), micro-batch {c.micro_batch_size}, logits stored: {c.store_logits}"]
    out += [_memory_line(sp.stage, sp.collect, plan.device_memory) for sp in plan.stages]
    full = full_logits_bytes_per_position(plan.shape)
    worst = store_bytes_per_position(plan.cfg)
    median = min(PAPER_MEDIAN_CANDIDATES, c.k_max + 1)
    typical = store_bytes_per_position(plan.cfg, median)
    out.append(f"  replay store: <= {worst:,} B per stored position (|S| = K_max+1 = {c.k_max + 1}), "
               f"{typical:,} B at |S| = {median} (the paper's median, capped); full fp16 logits: "
               f"{full:,} B ({100 * typical / full:.2f}% .. {100 * worst / full:.2f}%)")
    if train_data is not None:
        tokens, samples = train_data
        amount = c.positions.amount
        positions = (tokens if c.positions.strategy == "all" else
                     int(tokens * amount) if isinstance(amount, float) else min(tokens, amount * samples))
        bound = "" if isinstance(amount, float) or c.positions.strategy == "all" else "at most "
        out.append(f"  for {tokens:,} loss-bearing tokens in {samples:,} samples: {bound}{positions:,} stored "
                   f"positions, {_gib(positions * typical)} .. {_gib(positions * worst)}")
    return out


def _memory_line(stage: int, m: MemoryEstimate, device: int) -> str:
    terms = [(name, n) for name, n in (("weights", m.weights), ("grads", m.grads), ("optimizer", m.optimizer),
                                       ("activations", m.activations)) if n]
    verdict = "OK" if m.total <= device else "OVER"
    return (f"  PP stage {stage}: {' + '.join(f'{name} {_gib(n)}' for name, n in terms)} = {_gib(m.total)} "
            f"of {_gib(device)}: {verdict}")


def _gib(n: int) -> str:
    """Bytes as GiB, or MiB / KiB when small (tiny test models)."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
        if n >= size // 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"
