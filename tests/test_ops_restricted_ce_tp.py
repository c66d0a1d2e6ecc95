"""Vocab-parallel restricted cross entropy: TP=2 equals TP=1, with only O(N) scalars on the wire.

Two gloo ranks each hold half the rows of W. Loss must equal the single-process op on the full W; the
full weight gradient is the concatenation of the shards' gradients and the hidden gradient the SUM of the
ranks' partials (the all-reduce Megatron's column-parallel layer does upstream). Every torch.distributed
collective is instrumented inside the ranks: the op may issue exactly one MAX all-reduce of N elements and
one SUM all-reduce of 2*N, and nothing in backward. One spawn runs every case, for both backends (the
Triton kernel under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.distributed as dist

from replay_megatron.ops import restricted_cross_entropy, restricted_kl_divergence
from replay_megatron.platform.spawn import run_local
from restricted_ce_fixtures import loss_and_grads, make_case, rel_err

pytestmark = pytest.mark.mcore_compat  # CI also runs these on megatron-core 0.12.1 (README)

WORLD, V = 2, 54
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
CASES = [(0, 4), (1, None)]  # (seed, chunk_size)
_COLLECTIVES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
                "isend", "irecv", "all_gather_object", "broadcast_object_list", "gather_object"]


def _record_collectives(log: list) -> None:
    """Replace every torch.distributed collective by a wrapper that logs (name, op, elements)."""
    def wrap(name, fn):
        @functools.wraps(fn)
        def logged(*args, **kwargs):
            tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            op = kwargs.get("op", args[1] if name == "all_reduce" and len(args) > 1 else None)
            log.append((name, str(op), -1 if tensor is None else tensor.numel()))
            return fn(*args, **kwargs)
        return logged

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def _tp_rank(backends: list[str]) -> dict:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    log: list = []
    _record_collectives(log)
    out = {}
    for backend in backends:
        for seed, chunk in CASES:
            hidden, weight, candidates, targets, teacher = make_case(seed, v=V)
            shard = weight.chunk(WORLD)[rank]
            kw = dict(vocab_start=rank * shard.shape[0], tp_group=dist.group.WORLD, chunk_size=chunk, backend=backend)
            for name, fn, extra in [("ce", restricted_cross_entropy, ()), ("kl", restricted_kl_divergence, (teacher,))]:
                log.clear()
                tensors = loss_and_grads(fn, hidden, shard, candidates, targets, *extra, **kw)
                # numpy: run_local's torch queue would share tensors by fd, which dies with the child
                out[backend, seed, name] = (*(t.numpy() for t in tensors), list(log))
    return out


@pytest.mark.multiproc
def test_tp2_equals_tp1_with_scalar_only_collectives():
    per_rank = run_local(_tp_rank, WORLD, BACKENDS, env={"TRITON_INTERPRET": "1"})
    for (backend, seed, name), _ in per_rank[0].items():
        hidden, weight, candidates, targets, teacher = make_case(seed, v=V)
        n = hidden.shape[0]
        # the cases include rows that have no candidate at all on one of the shards
        on_shard = [((candidates >= r * V // WORLD) & (candidates < (r + 1) * V // WORLD)).any(1) for r in range(WORLD)]
        assert all((~s & (targets >= 0)).any() for s in on_shard)
        fn, extra = (restricted_cross_entropy, ()) if name == "ce" else (restricted_kl_divergence, (teacher,))
        loss1, dh1, dw1 = loss_and_grads(fn, hidden, weight, candidates, targets, *extra)
        ranks = [(*map(torch.from_numpy, r[backend, seed, name][:3]), r[backend, seed, name][3]) for r in per_rank]
        for loss, *_ in ranks:
            assert rel_err(loss, loss1) < 1e-6, (backend, seed, name)
        assert rel_err(sum(r[1] for r in ranks), dh1) < 1e-6, (backend, seed, name)
        assert rel_err(torch.cat([r[2] for r in ranks]), dw1) < 1e-6, (backend, seed, name)
        for *_, log in ranks:  # forward: MAX of N, one packed SUM of 2N; backward: nothing
            assert log == [("all_reduce", str(dist.ReduceOp.MAX), n), ("all_reduce", str(dist.ReduceOp.SUM), 2 * n)]
            assert max(numel for *_, numel in log) <= 2 * n
