"""Stage 1's output layer: restricted cross entropy on the stored candidates instead of full logits.

The GPTModel's own output layer call is kept (so tied/untied weights, the pipeline's tied copy on the last
stage and DDP all stay Megatron's); while replay targets are set, the layer computes the per-position
restricted CE of SPEC.md section 2 at the stored positions and returns it as a dense [s, b, 1] tensor
(0 elsewhere) in place of [s, b, V/TP] logits. No vocabulary-sized tensor is formed: the weight gradient
goes straight into DDP's main_grad buffer (replay_megatron.ops), densely only under overlap_grad_reduce.
Optionally (SPEC.md section 2, default off) the loss is CE + kl_weight * KL against stored teacher logits.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from replay_megatron.ops import restricted_ce_with_kl, restricted_cross_entropy, validate_candidates
from replay_megatron.platform.device import host_to_device


@dataclass
class ReplayTargets:
    """Stored positions of one micro-batch: (batch row, position) pairs, candidates [N, C], gold [N], and
    optionally the teacher's logits of the candidates [N, C] fp32 (-inf at padding) for the KL term."""

    rows: torch.Tensor
    positions: torch.Tensor
    candidates: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None = None

    @property
    def num_positions(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> ReplayTargets:
        """The targets on `device` (built on the host from the store, they reach an accelerator once)."""
        moved = [None if t is None else host_to_device(t, device) for t in
                 (self.rows, self.positions, self.candidates, self.targets, self.teacher_logits)]
        return ReplayTargets(*moved)


def replay_targets(segments: torch.Tensor, labels: torch.Tensor, lookup: Callable, *, vocab_size: int,
                   with_teacher: bool = False) -> ReplayTargets:
    """Gather the stored records of a micro-batch's samples (`segments` [n, 4]: sample id, row, first
    column, length, as `GPTBatch.segments`: a record's positions are inside its sample, so one store
    serves packed and unpacked batches); `lookup(sample_id)` returns a record with
    `positions`, `targets` and `candidates` (-1 padded), like `ReplayStore.get`, and with `with_teacher`
    also `candidate_logits` (the store's, kept when Stage 0 ran with collect.store_logits).

    The stored gold of every position must equal the batch's label there: a store made from other data
    is refused here, naming the sample, and so are candidate sets that break Stage 0's invariants (ids in
    [0, vocab_size), no duplicates, gold included). `labels` are the host copy of the batch's labels: the
    join and its checks run on the host, so the loss skips its own (a device sync per micro-batch);
    `ReplayTargets.to` then moves the result to the device in one go.
    """
    if labels.device.type != "cpu":
        raise ValueError(f"replay_targets joins on the host: pass the batch's labels before they move to the "
                         f"device (got labels on {labels.device})")
    rows, positions, candidates, targets, teacher = [], [], [], [], []
    for sample_id, row, start, length in segments.tolist():
        record = lookup(sample_id)
        pos = torch.as_tensor(record.positions, dtype=torch.long)
        gold = torch.as_tensor(record.targets, dtype=torch.long)
        if pos.numel() and (pos.max() >= length or not torch.equal(labels[row, start + pos], gold)):
            raise ValueError(f"replay store record of sample {sample_id} does not match the token data "
                             "(positions or gold tokens differ): was the store collected from this dataset?")
        rows.append(torch.full_like(pos, row))
        positions.append(start + pos)
        candidates.append(torch.as_tensor(record.candidates, dtype=torch.long))
        targets.append(gold)
        if with_teacher:
            if getattr(record, "candidate_logits", None) is None:
                raise ValueError(f"replay store record of sample {sample_id} has no candidate_logits: the KL term "
                                 "needs a store collected with collect.store_logits")
            teacher.append(torch.as_tensor(record.candidate_logits, dtype=torch.float32))
    width = max((c.shape[1] for c in candidates), default=1)
    result = ReplayTargets(torch.cat(rows), torch.cat(positions), _pad_columns(candidates, width, -1, torch.long),
                           torch.cat(targets),
                           _pad_columns(teacher, width, float("-inf"), torch.float32) if with_teacher else None)
    validate_candidates(result.candidates, result.targets, vocab_size)
    return result


def _pad_columns(parts: list[torch.Tensor], width: int, value, dtype: torch.dtype) -> torch.Tensor:
    """Concatenate [n_i, c_i] tensors into [sum n_i, width], padding the columns with `value`."""
    if not parts:
        return torch.empty(0, width, dtype=dtype)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=value) for p in parts])


def _output_layer(chunk: torch.nn.Module):
    """(the GPTModel's output layer or None off the last stage, whether a DDP wrapper overlaps grad reduce)."""
    module, overlap = chunk, False
    while not hasattr(module, "output_layer") and hasattr(module, "module"):
        overlap = overlap or bool(getattr(getattr(module, "ddp_config", None), "overlap_grad_reduce", False))
        module = module.module  # DDP / Float16Module wrappers
    return getattr(module, "output_layer", None), overlap


def _restricted_forward(layer, targets: ReplayTargets, kl_weight: float, fuse_main_grad: bool) -> Callable:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    def forward(hidden: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        if getattr(layer, "sequence_parallel", False):
            raise NotImplementedError("the replay loss does not support sequence parallelism yet")
        weight = layer.weight if weight is None else weight
        tp = parallel_state.get_tensor_model_parallel_world_size()
        # identity forward, all-reduce of dh over TP backward: what ColumnParallelLinear does to its input
        hidden = copy_to_tensor_model_parallel_region(hidden) if tp > 1 else hidden
        t = targets
        h = hidden[t.positions, t.rows]  # [N, H]
        args = (h, weight, t.candidates, t.targets)
        options = dict(vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0],
                       tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
                       fuse_main_grad=fuse_main_grad, validate=False)  # replay_targets validated them
        if kl_weight > 0:
            loss = restricted_ce_with_kl(*args, t.teacher_logits, kl_weight, **options)
        else:
            loss = restricted_cross_entropy(*args, **options)
        dense = hidden.new_zeros(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32)
        dense = dense.index_put((t.positions, t.rows, torch.zeros_like(t.rows)), loss)
        return dense, None

    return forward


@contextlib.contextmanager
def set_replay_targets(chunk: torch.nn.Module, targets: ReplayTargets | None, *,
                       kl_weight: float = 0.0) -> Iterator[None]:
    """Within the block, the chunk's output layer (last stage only) computes the restricted CE (plus
    kl_weight * KL when kl_weight > 0, which needs `targets.teacher_logits`); `targets` on the model's device,
    None on the other pipeline stages (they hold no output layer)."""
    if kl_weight > 0 and targets is not None and targets.teacher_logits is None:
        raise ValueError("kl_weight > 0 needs the teacher's candidate logits: build the targets with "
                         "replay_targets(..., with_teacher=True) from a store collected with collect.store_logits")
    layer, overlap_grad_reduce = _output_layer(chunk)
    if layer is None:  # not the last pipeline stage
        yield
        return
    # DDP's overlap_grad_reduce hook needs a param.grad to mark the bucket ready: dense gradient there
    layer.forward = _restricted_forward(layer, targets, kl_weight, fuse_main_grad=not overlap_grad_reduce)
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward
