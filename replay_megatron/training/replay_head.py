"""Stage 1's output layer: restricted cross entropy on the stored candidates instead of full logits.

The GPTModel's own output layer call is kept (so tied/untied weights, the pipeline's tied copy on the last
stage and DDP all stay Megatron's); while replay targets are set, the layer computes the per-position
restricted CE of SPEC.md section 2 at the stored positions and returns it as a dense [s, b, 1] tensor
(0 elsewhere) in place of [s, b, V/TP] logits. No vocabulary-sized tensor is formed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from replay_megatron.ops import restricted_cross_entropy


@dataclass
class ReplayTargets:
    """Stored positions of one micro-batch: (batch row, position) pairs, candidates [N, C], gold [N]."""

    rows: torch.Tensor
    positions: torch.Tensor
    candidates: torch.Tensor
    targets: torch.Tensor

    @property
    def num_positions(self) -> int:
        return int(self.targets.numel())


def replay_targets(sample_ids: torch.Tensor, labels: torch.Tensor, lookup: Callable) -> ReplayTargets:
    """Gather the stored records of a micro-batch's samples; `lookup(sample_id)` returns a record with
    `positions`, `targets` and `candidates` (-1 padded), like `ReplayStore.get`.

    The stored gold of every position must equal the batch's label there: a store made from other data
    is refused here, naming the sample.
    """
    rows, positions, candidates, targets = [], [], [], []
    for row, sample_id in enumerate(sample_ids.tolist()):
        record = lookup(sample_id)
        pos = torch.as_tensor(record.positions, dtype=torch.long)
        gold = torch.as_tensor(record.targets, dtype=torch.long)
        if pos.numel() and (pos.max() >= labels.shape[1] or not torch.equal(labels[row, pos], gold)):
            raise ValueError(f"replay store record of sample {sample_id} does not match the token data "
                             "(positions or gold tokens differ): was the store collected from this dataset?")
        rows.append(torch.full_like(pos, row))
        positions.append(pos)
        candidates.append(torch.as_tensor(record.candidates, dtype=torch.long))
        targets.append(gold)
    width = max((c.shape[1] for c in candidates), default=1)
    padded = [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=-1) for c in candidates]
    return ReplayTargets(torch.cat(rows), torch.cat(positions),
                         torch.cat(padded) if padded else torch.empty(0, width, dtype=torch.long),
                         torch.cat(targets))


def _output_layer(chunk: torch.nn.Module):
    module = chunk
    while not hasattr(module, "output_layer") and hasattr(module, "module"):
        module = module.module  # DDP / Float16Module wrappers
    return getattr(module, "output_layer", None)


def _restricted_forward(layer, targets: ReplayTargets) -> Callable:
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
        h = hidden[t.positions.to(hidden.device), t.rows.to(hidden.device)]  # [N, H]
        loss = restricted_cross_entropy(
            h, weight, t.candidates.to(hidden.device), t.targets.to(hidden.device),
            vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0],
            tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None)
        dense = hidden.new_zeros(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32)
        dense = dense.index_put((t.positions.to(hidden.device), t.rows.to(hidden.device),
                                 torch.zeros_like(t.rows, device=hidden.device)), loss)
        return dense, None

    return forward


@contextlib.contextmanager
def set_replay_targets(chunk: torch.nn.Module, targets: ReplayTargets) -> Iterator[None]:
    """Within the block, the chunk's output layer (last stage only) computes the restricted CE."""
    layer = _output_layer(chunk)
    if layer is None:  # not the last pipeline stage
        yield
        return
    layer.forward = _restricted_forward(layer, targets)
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward
