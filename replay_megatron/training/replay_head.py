"""Stage 1's output head: restricted cross entropy on the stored candidates instead of full logits.

`replay_targets` joins a micro-batch's samples with their Stage 0 records (on the host, checked against
the batch's labels); `RestrictedCEHead` is what the GPTModel's output layer computes from the final hidden
states and its weight shard while the replay objective runs (`models.output_layer`): the per-position
restricted CE of SPEC.md section 2 at the stored positions, as a dense [s, b, 1] tensor (0 elsewhere) in
place of [s, b, V/TP] logits. No vocabulary-sized tensor is formed: the weight gradient goes straight into
DDP's main_grad buffer (replay_megatron.ops), densely only under overlap_grad_reduce. Optionally (SPEC.md
section 2, default off) the loss is CE + kl_weight * KL against stored teacher logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


class RestrictedCEHead:
    """The output layer's head for Stage 1 (`models.output_layer`): per-position restricted CE of SPEC.md
    section 2 at the stored positions (plus kl_weight * KL against the teacher's candidate logits when
    kl_weight > 0), returned as a dense [s, b, 1] fp32 tensor, 0 elsewhere.

    `targets` on the model's device. The weight gradient goes straight into DDP's main_grad buffer
    (`fuse_main_grad`), densely only when DDP overlaps its grad reduce.
    """

    def __init__(self, targets: ReplayTargets, kl_weight: float = 0.0, *, fuse_main_grad: bool = True) -> None:
        if kl_weight > 0 and targets.teacher_logits is None:
            raise ValueError("kl_weight > 0 needs the teacher's candidate logits: build the targets with "
                             "replay_targets(..., with_teacher=True) from a store collected with "
                             "collect.store_logits")
        self.targets, self.kl_weight, self.fuse_main_grad = targets, kl_weight, fuse_main_grad

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        tp = parallel_state.get_tensor_model_parallel_world_size()
        # identity forward, all-reduce of dh over TP backward: what ColumnParallelLinear does to its input
        hidden = copy_to_tensor_model_parallel_region(hidden) if tp > 1 else hidden
        t = self.targets
        args = (hidden[t.positions, t.rows], weight, t.candidates, t.targets)  # h: [N, H]
        options = dict(vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0],
                       tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
                       fuse_main_grad=self.fuse_main_grad, validate=False)  # replay_targets validated them
        if self.kl_weight > 0:
            loss = restricted_ce_with_kl(*args, t.teacher_logits, self.kl_weight, **options)
        else:
            loss = restricted_cross_entropy(*args, **options)
        dense = hidden.new_zeros(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32)
        return dense.index_put((t.positions, t.rows, torch.zeros_like(t.rows)), loss)
