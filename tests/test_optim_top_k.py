"""MoFO's distributed top-k (optim.top_k) on 2 gloo ranks equals a sort of the whole tensor by
(-value, index): a tensor full of ties split over TP along either dimension, and split into flat
distributed-optimizer shards at an offset that cuts a row."""
import pytest
import torch
import torch.distributed as dist

from replay_megatron.optim.tensor_layout import Slot, TensorLayout
from replay_megatron.optim.top_k import top_k_masks
from replay_megatron.platform.spawn import run_local

KS = (1, 7, 13, 30, 59, 60)


def sorted_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.sort(values, descending=True, stable=True).indices[:k]
    return torch.zeros(values.numel(), dtype=torch.bool).index_fill_(0, top, True)


def _rank() -> dict:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    full = torch.randint(0, 5, (6, 10), generator=torch.Generator().manual_seed(0)).float()  # many ties
    layouts = {}
    for dim in (0, 1):  # TP shards along `partition_dim`
        local = full.chunk(2, dim=dim)[rank].contiguous()
        layouts[f"tp{dim}"] = (local, 0, TensorLayout([Slot(tuple(local.shape), True, dim, 2, rank)], {local: (0, 0)},
                                                      tp_group=dist.group.WORLD), dim)
    cut = 23  # DP shards: flat ranges of the whole tensor
    piece = full.reshape(-1)[:cut] if rank == 0 else full.reshape(-1)[cut:]
    offset = 0 if rank == 0 else cut
    layouts["dp"] = (piece, offset, TensorLayout([Slot(tuple(full.shape))], {piece: (0, offset)},
                                                 dp_group=dist.group.WORLD), None)
    out = {}
    for name, (local, offset, layout, dim) in layouts.items():
        for k in KS:
            [mask] = top_k_masks([local], [0], [offset], torch.tensor([k]), layout)
            parts: list = [None, None]
            dist.all_gather_object(parts, mask.reshape(local.shape))
            whole = torch.cat(parts, dim=dim if dim is not None else 0).reshape(-1)
            out[(name, k)] = bool(torch.equal(whole, sorted_top_k(full.reshape(-1), k)))
    return out


@pytest.mark.multiproc
def test_distributed_top_k_equals_a_sort_of_the_whole_tensor():
    for result in run_local(_rank, 2):
        assert all(result.values()), result
