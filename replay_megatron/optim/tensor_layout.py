"""Where each tensor an optimizer holds sits in the model's logical tensors (SPEC.md section 4).

The per-tensor baselines (TAM's cosine, MoFO's top-k) need statistics of whole logical tensors, while the
optimizer may hold a TP shard (megatron's `tensor_model_parallel`, split along `partition_dim`), an fp32
copy of it (mixed precision) or a flat range of that shard (the distributed optimizer, sharded over DP).
A `TensorLayout` numbers the logical tensors of this rank's model ("slots", the same numbering on every
TP and DP rank of a pipeline stage), maps each optimizer tensor to its slot and flat offset, and reduces
per-slot rows to the logical tensors': summed over the DP shards (distributed optimizer only), then over
TP for TP-sharded slots. Float64 rows go through `platform.exact_sum` (no float64 collectives), counts
are int64 all-reduces. A TP-sharded tensor's logical order is megatron's: its TP shards concatenated
along `partition_dim` in TP-rank order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from replay_megatron.platform.exact_sum import all_reduce_float64


@dataclass(frozen=True)
class Slot:
    """One logical tensor as this rank holds it: its TP-local shape and how TP splits it."""

    local_shape: tuple[int, ...]
    tp_sharded: bool = False
    partition_dim: int = 0
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def dim(self) -> int:
        return len(self.local_shape)

    @property
    def numel(self) -> int:
        """Elements of the logical tensor (all TP shards)."""
        return math.prod(self.local_shape) * (self.tp_size if self.tp_sharded else 1)

    def logical_index(self, local_flat: Tensor) -> Tensor:
        """Flat indices in the logical tensor of flat indices in the TP-local tensor (int64)."""
        if not self.tp_sharded:
            return local_flat
        span = math.prod(self.local_shape[self.partition_dim:])  # one outer index's elements on this rank
        return (local_flat // span) * (span * self.tp_size) + self.tp_rank * span + local_flat % span


def _world(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _slot_of(param: Tensor, tp_group: Optional[dist.ProcessGroup]) -> Slot:
    sharded = bool(getattr(param, "tensor_model_parallel", False)) and _world(tp_group) > 1
    return Slot(tuple(param.shape), sharded, int(getattr(param, "partition_dim", 0)),
                _world(tp_group), dist.get_rank(tp_group) if sharded else 0)


class TensorLayout:
    """Slots of the logical tensors, the (slot, flat offset) of each optimizer tensor, and the reductions."""

    def __init__(self, slots: Sequence[Slot], pieces: dict[Tensor, tuple[int, int]],
                 tp_group: Optional[dist.ProcessGroup] = None, dp_group: Optional[dist.ProcessGroup] = None) -> None:
        self.slots = list(slots)
        self.pieces = pieces
        self.tp_group = tp_group if _world(tp_group) > 1 else None
        self.dp_group = dp_group if _world(dp_group) > 1 else None
        self._sharded: Optional[Tensor] = None

    @classmethod
    def of_params(cls, params: Iterable[Tensor], tp_group: Optional[dist.ProcessGroup] = None) -> "TensorLayout":
        """Each parameter whole (or a TP shard, by its megatron attributes), its own slot."""
        params = list(params)
        return cls([_slot_of(p, tp_group) for p in params], {p: (i, 0) for i, p in enumerate(params)}, tp_group)

    @classmethod
    def of_megatron(cls, wrapper: Any, model_chunks: Sequence[Any]) -> "TensorLayout":
        """The layout of a megatron-core optimizer wrapper's inner optimizer (FP32Optimizer,
        Float16OptimizerWithFloat16Params or DistributedOptimizer) over `model_chunks`."""
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
        model = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
        index = {p: i for i, p in enumerate(model)}
        pieces: dict[Tensor, tuple[int, int]] = {}
        dp_group = None
        if hasattr(wrapper, "shard_fp32_groups"):  # DistributedOptimizer: flat ranges of the TP-local tensors
            dp_group = wrapper.data_parallel_group
            pairs = [(m, s) for groups in ((wrapper.model_fp32_groups, wrapper.shard_fp32_groups),
                                           (wrapper.model_float16_groups, wrapper.shard_fp32_from_float16_groups))
                     for ms, ss in zip(*groups) for m, s in zip(ms, ss)]
            for m, s in pairs:
                pieces[s] = (index[m], wrapper._get_model_param_range_map(m)["param"].start)
        elif hasattr(wrapper, "fp32_from_float16_groups"):  # mixed precision: whole fp32 copies
            pairs = [(m, s) for ms, ss in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups)
                     for m, s in zip(ms, ss)]
            pairs += [(p, p) for group in wrapper.fp32_from_fp32_groups for p in group]
            pieces = {s: (index[m], 0) for m, s in pairs}
        else:  # FP32Optimizer: the model's parameters themselves
            pieces = {p: (index[p], 0) for group in wrapper.optimizer.param_groups for p in group["params"]}
        return cls([_slot_of(p, tp_group) for p in model], pieces, tp_group, dp_group)

    def slot(self, tensor: Tensor) -> tuple[Slot, int, int]:
        """(slot, slot index, flat offset in the TP-local tensor) of an optimizer tensor."""
        index, offset = self.pieces[tensor]
        return self.slots[index], index, offset

    def _sharded_rows(self, device: torch.device) -> Tensor:
        if self._sharded is None or self._sharded.device != device:
            self._sharded = torch.tensor([s.tp_sharded for s in self.slots], device=device).unsqueeze(1)
        return self._sharded

    def _reduce(self, rows: Tensor, all_reduce) -> Tensor:
        if self.dp_group is not None:
            rows = all_reduce(rows, self.dp_group)
        if self.tp_group is not None:
            sharded = self._sharded_rows(rows.device)
            rows = torch.where(sharded, all_reduce(torch.where(sharded, rows, 0), self.tp_group), rows)
        return rows

    def reduce_sums(self, rows: Tensor) -> Tensor:
        """Per-slot float64 rows [slots, k] of this rank's pieces -> the logical tensors' sums."""
        return self._reduce(rows, lambda r, g: all_reduce_float64(r.reshape(-1), group=g).view(r.shape))

    def reduce_counts(self, rows: Tensor) -> Tensor:
        """Per-slot int64 counts [slots, k] of this rank's pieces -> the logical tensors' counts."""
        def add(r: Tensor, group: dist.ProcessGroup) -> Tensor:
            r = r.contiguous().clone()
            dist.all_reduce(r, group=group)
            return r
        return self._reduce(rows, add)
