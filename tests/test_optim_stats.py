"""Distributed MoClip statistics (SPEC.md section 3 step 1) and the TP hooks of TAM/MoFO (section 4).

Two gloo ranks hold a model the way Megatron would, and each run must equal one process holding the
whole model (parameters after 5 steps to 1e-6, the same cos(phi) sequence):
- "pp": two pipeline stages with TP=1; each rank owns its own layers, and the tied embedding lives on
  both stages, the last stage's copy marked `shared` (megatron-core's PP tied-embedding attribute);
- "tp": TP=2; a weight split by rows (`tensor_model_parallel`, `partition_dim=0`) and a norm weight
  replicated on both ranks (a TP duplicate).
The mask is megatron-core's grad-norm rule (`counts_toward_global_stats`), the reducer one collective
per step (counted: an all-gather of the three float64 sums' bits, `platform.exact_sum`). Gradients are a deterministic function of the parameters, so a wrong step shows up
in later gradients too. In the "tp" layout, TAM (TensorParallelSums) and MoFO (TensorParallelGather)
must also equal their single-process runs.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from replay_megatron.optim import (TAM, GlobalSumsReducer, MoClip, MoFO, TensorParallelGather, TensorParallelSums,
                                   counts_toward_global_stats)
from replay_megatron.platform.spawn import run_local

WORLD, STEPS, TOL = 2, 5, 1e-6
SHAPES = {"emb": (6, 4), "layer0": (4, 4), "layer1": (4, 4), "w": (8, 4), "norm": (8,)}
# name -> (rank, rows of the full tensor or None, attributes); the same name on two ranks is one tensor.
LAYOUTS = {
    "pp": [("emb", 0, None, {}), ("layer0", 0, None, {}), ("layer1", 1, None, {}), ("emb", 1, None, {"shared": True})],
    "tp": [("w", 0, slice(0, 4), {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1}),
           ("w", 1, slice(4, 8), {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1}),
           ("norm", 0, None, {}), ("norm", 1, None, {})],
}


def initial(name: str) -> torch.Tensor:
    return torch.randn(SHAPES[name], generator=torch.Generator().manual_seed(list(SHAPES).index(name)))


def set_grad(name: str, p: torch.Tensor, rows, step: int) -> None:
    """A gradient that depends on the parameter: pull towards a target that moves every step."""
    gen = torch.Generator().manual_seed(100 * step + 10 + list(SHAPES).index(name))
    target = torch.randn(SHAPES[name], generator=gen)
    target = target if rows is None else target[rows]
    p.grad = (p.detach() - target) * (2.0 if name == "emb" else 1.0)  # the tied embedding gets two grads


def local_params(layout: str, rank) -> list[tuple[str, torch.Tensor, object]]:
    """(name, parameter, rows) this rank holds; rank None is the single process holding everything once."""
    out, seen = [], set()
    for name, owner, rows, attrs in LAYOUTS[layout]:
        if rank is None:
            if name not in seen:
                seen.add(name)
                out.append((name, torch.nn.Parameter(initial(name)), None))
        elif owner == rank:
            p = torch.nn.Parameter(initial(name) if rows is None else initial(name)[rows].clone())
            for k, v in attrs.items():
                setattr(p, k, v)
            out.append((name, p, rows))
    return out


def train(make_opt, held) -> tuple[dict, list[float]]:
    opt = make_opt([p for _, p, _ in held])
    cos = []
    for step in range(STEPS):
        for name, p, rows in held:
            set_grad(name, p, rows, step)
        opt.step()
        stats = getattr(opt, "last_stats", None)
        cos.append(float("nan") if stats is None else stats.cos_phi.item())
    return {(name, str(rows)): p.detach().clone() for name, p, rows in held}, cos


def assemble(held_by_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Full tensors from the ranks' pieces (row shards concatenated); replicas must agree exactly."""
    full: dict[str, list] = {}
    for held in held_by_rank:
        for (name, rows), t in held.items():
            full.setdefault(name, []).append((rows, t))
    out = {}
    for name, pieces in full.items():
        if pieces[0][0] == "None":
            assert all((t == pieces[0][1]).all() for _, t in pieces), f"replicas of {name} diverged"
            out[name] = torch.from_numpy(pieces[0][1])
        else:
            out[name] = torch.cat([torch.from_numpy(t) for _, t in sorted(pieces, key=lambda rt: rt[0])])
    return out


OPTIMIZERS = {
    "moclip": lambda group, params: MoClip(params, lr=0.05, max_angle=45.0, weight_decay=0.1,
                                           stats_reducer=GlobalSumsReducer() if group else None,
                                           counts_toward_stats=functools.partial(counts_toward_global_stats,
                                                                                 tp_group=group) if group else None),
    "tam": lambda group, params: TAM(params, lr=0.05, tensor_sums=TensorParallelSums(group) if group else None,
                                     cos_update=True),
    "mofo": lambda group, params: MoFO(params, lr=0.05, fraction=0.3,
                                       gather=TensorParallelGather(group) if group else None),
}
CASES = [("pp", "moclip"), ("tp", "moclip"), ("tp", "tam"), ("tp", "mofo")]


def _rank() -> dict:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    singletons = [dist.new_group([r]) for r in range(WORLD)]  # every rank takes part in every new_group
    calls: list[tuple[str, str, int]] = []

    def counting(name: str):
        collective = getattr(dist, name)

        @functools.wraps(collective)
        def counted(tensor, *args, **kwargs):
            if name == "all_reduce":
                calls.append((name, str(kwargs.get("op", args[0] if args else dist.ReduceOp.SUM)), tensor.numel()))
            else:  # all_gather_into_tensor(output, input): what each rank sends
                calls.append((name, str(args[0].dtype), args[0].numel()))
            return collective(tensor, *args, **kwargs)
        return counted

    for collective in ("all_reduce", "all_gather_into_tensor"):
        setattr(dist, collective, counting(collective))
    out = {}
    for layout, name in CASES:
        tp_group = singletons[rank] if layout == "pp" else dist.group.WORLD
        calls.clear()
        params, cos = train(functools.partial(OPTIMIZERS[name], tp_group), local_params(layout, rank))
        # numpy: run_local's torch queue would share tensors by fd, which dies with the child
        out[(layout, name)] = ({k: t.numpy() for k, t in params.items()}, cos)
        out[(layout, name, "collectives")] = list(calls)
    return out


@pytest.mark.multiproc
def test_distributed_statistics_equal_one_process():
    results = run_local(_rank, WORLD)
    for layout, name in CASES:
        single_params, single_cos = train(functools.partial(OPTIMIZERS[name], None), local_params(layout, None))
        full = assemble([r[(layout, name)][0] for r in results])
        single = {n: t for (n, _), t in single_params.items()}
        assert full.keys() == single.keys()
        for n in full:
            torch.testing.assert_close(full[n], single[n], rtol=0, atol=TOL, msg=f"{layout}/{name}: {n}")
        for r in results:
            torch.testing.assert_close(torch.tensor(r[(layout, name)][1]), torch.tensor(single_cos),
                                       rtol=0, atol=TOL, equal_nan=True)
        if name == "moclip":
            assert sum(c == c and c < 0.7071 for c in single_cos) > 0, "45 degrees must clip in this case"
            for r in results:  # one collective per step, nothing else: the three float64 sums' bits as 6 int32
                assert r[(layout, name, "collectives")] == [("all_gather_into_tensor", str(torch.int32), 6)] * STEPS
