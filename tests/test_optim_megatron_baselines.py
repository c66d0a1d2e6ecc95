"""MoFO and TAM (its cosine variant) inside megatron-core's optimizer stack (optim.megatron.build_optimizer):
5 steps of a tiny Qwen3 from the same weights against one process (fp32, parameters within 1e-5).
- DP2 (DistributedOptimizer, state sharded over DP: flat shards whose per-tensor statistics and top-k
  span ranks), trained end to end: equal.
- TP2xPP2 (FP32Optimizer) on the same gradients: the one-process run's gradients, recorded before each
  optimizer step in HF naming, go shard by shard into each main_grad in place of a backward pass, then
  megatron's step (grad-norm clipping included): equal. This is the optimizers' layout independence.
- TP2xPP2 trained end to end: TAM equal. MoFO's selection is a step function of |m|, and the model's own
  TP2 gradients differ from one process by fp32 reduction order (row-parallel all-reduce vs one matmul),
  which can swap two entries of nearly equal |m| at the threshold (an lr-sized difference in those
  entries). So there MoFO is checked as: its last step updated exactly the top-k of the logical |m| the
  ranks hold (assembled over TP, ties by index), and at most 0.1% of the entries differ by more than 1e-5.
The tiny model's tied embedding gets a dense gradient (through the output layer), so no |m| ties arise
here; the tie split by index across TP and DP shards is test_optim_top_k's.
"""
import pytest
import torch

from optimizer_equivalence_fixtures import (TOL, changed_fractions, split_over_dp, step_on_recorded_gradients,
                                            train_variants)
from replay_megatron.platform.spawn import run_local
from train_fixtures import tiny_model_and_steps

STEPS = 5
# name -> build_optimizer arguments; TAM's momentum SGD needs a larger lr than Adam's to move the weights.
# The cosine variant runs every statistic of the plain one and scales the update by it (the plain one
# equals its reference in test_optim_baselines); one TAM keeps the multi-process runs short.
VARIANTS = {"mofo": dict(name="mofo", lr=1e-3, mofo_fraction=0.2),
            "tam_cosine": dict(name="tam", lr=0.5, tam_variant="cosine")}


def inspect_wrappers(variant, model, optimizer, before, kwargs) -> dict:
    """One wrapper of the expected kind; at TP > 1, whether MoFO's last step selected exactly its top-k."""
    from megatron.core import parallel_state

    [wrapper] = getattr(optimizer, "chained_optimizers", [optimizer])
    out = {f"{variant}_wrapper": type(wrapper).__name__}
    if variant == "mofo" and parallel_state.get_tensor_model_parallel_world_size() > 1:
        out["mofo_selection_exact"] = _last_step_selected_top_k(model, wrapper.optimizer, before, kwargs)
    return out


def _last_step_selected_top_k(model, mofo, before, kwargs) -> bool:
    """Whether the entries of each TP-sharded matrix that changed in the last step are exactly the top
    k = floor(fraction*numel) of the logical |m| (the shards assembled along `partition_dim`, ties by index)."""
    import math

    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    ok = True
    for name, p in model.module.named_parameters():
        if p.dim() < 2:
            continue
        local = torch.stack([mofo.state[p]["exp_avg"].abs(), (p.detach() != before[name]).float()])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        m, changed = torch.cat(parts, dim=p.partition_dim + 1).reshape(2, -1)
        k = max(1, math.floor(m.numel() * kwargs["mofo_fraction"]))
        top = torch.sort(m, descending=True, stable=True).indices[:k]  # ties: lower index first
        ok &= bool(torch.equal(changed.bool(), torch.zeros_like(changed, dtype=torch.bool).index_fill_(0, top, True)))
    return ok


@pytest.fixture(scope="module")
def setup():
    hf, sd, steps = tiny_model_and_steps(STEPS)
    [ref] = run_local(train_variants, 1, VARIANTS, hf, sd, [steps], 1, 1, False, None, inspect_wrappers)
    for variant in VARIANTS:
        assert ref[f"{variant}_wrapper"] == "FP32Optimizer"
        changed = changed_fractions(ref[variant], sd)
        if variant == "mofo":  # 5 steps of a 20% selection leave most matrix entries where they were
            assert 0.2 <= changed["model.layers.0.mlp.down_proj.weight"] < 0.9, changed
            assert changed["model.norm.weight"] == 1.0
    return hf, sd, steps, ref


@pytest.mark.multiproc
def test_tp2_pp2_baselines_equal_single_process(setup):
    hf, sd, steps, ref = setup
    for out in run_local(train_variants, 4, VARIANTS, hf, sd, [steps], 2, 2, False, ref, inspect_wrappers):
        assert out["mofo_selection_exact"]
        assert out["tam_cosine"] < TOL, out
        assert out["mofo_beyond_tol"] < 1e-3, out  # threshold swaps only (see the module doc)


@pytest.mark.multiproc
def test_tp2_pp2_baselines_on_the_same_gradients_equal_single_process(setup):
    hf, sd, _, ref = setup  # the fixture checked that the reference moved (MoFO: 20%-90% of a matrix)
    for out in run_local(step_on_recorded_gradients, 4, VARIANTS, hf, sd, ref, 2, 2):
        assert max(out[v] for v in VARIANTS) < TOL, out


@pytest.mark.multiproc
def test_dp2_distributed_optimizer_baselines_equal_single_process(setup):
    hf, sd, steps, ref = setup
    for out in run_local(train_variants, 2, VARIANTS, hf, sd, split_over_dp(steps, 2), 1, 1, True, ref, inspect_wrappers):
        assert {out[f"{v}_wrapper"] for v in VARIANTS} == {"DistributedOptimizer"}
        assert max(out[v] for v in VARIANTS) < TOL, out
