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

from replay_megatron.platform.spawn import run_local
from train_fixtures import main_grads_to_hf, param_differences, set_main_grads_from_hf, tiny_model_and_steps

TOL = 1e-5
STEPS = 5
# name -> build_optimizer arguments; TAM's momentum SGD needs a larger lr than Adam's to move the weights.
# The cosine variant runs every statistic of the plain one and scales the update by it (the plain one
# equals its reference in test_optim_baselines); one TAM keeps the multi-process runs short.
VARIANTS = {"mofo": dict(name="mofo", lr=1e-3, mofo_fraction=0.2),
            "tam_cosine": dict(name="tam", lr=0.5, tam_variant="cosine")}


def _model_and_optimizer(hf, hf_sd, layout, kwargs, distributed_optimizer):
    """This rank's stage in megatron DDP, loaded from the HF weights, and the variant's megatron optimizer
    (FP32Optimizer, or DistributedOptimizer sharding its state over DP)."""
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.optim.megatron import build_optimizer
    from replay_megatron.training.setup import build_ddp_model

    model = build_ddp_model(hf, layout, distributed_optimizer=distributed_optimizer)
    load_hf_into_model(model.module, hf_sd, hf, tp=layout.tp, tp_rank=layout.tp_rank)
    model.broadcast_params()
    optimizer = build_optimizer(**kwargs, model_chunks=[model], weight_decay=0.1, clip_grad=1.0,
                                distributed_optimizer=distributed_optimizer)
    [wrapper] = getattr(optimizer, "chained_optimizers", [optimizer])
    assert type(wrapper).__name__ == ("DistributedOptimizer" if distributed_optimizer else "FP32Optimizer")
    return model, optimizer, wrapper


class GradientRecorder:
    """Megatron's optimizer, recording before each step the gradients it is about to apply (HF names)."""

    def __init__(self, optimizer, stage, hf) -> None:
        self.optimizer, self.stage, self.hf, self.grads = optimizer, stage, hf, []

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def step(self):
        self.grads.append(main_grads_to_hf(self.stage, self.hf))
        return self.optimizer.step()


def run_variants(hf, hf_sd, per_rank_steps, tp, pp, distributed_optimizer, check_against=None):
    """Each variant trains from the same weights on this DP rank's micro-batches (megatron's rank order
    puts TP innermost, then PP: the DP rank is RANK // (tp*pp)). Returns, per variant, the HF state dict
    and (`{variant}_grads`) each step's gradients (one process), or the max |param - check_against[variant]|
    over this rank's parameters."""
    import os

    from replay_megatron.models.conversion import model_to_hf
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.step import train_step

    steps = per_rank_steps[int(os.environ.get("RANK", "0")) // (tp * pp)]
    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    out = {}
    for variant, kwargs in VARIANTS.items():
        model, optimizer, wrapper = _model_and_optimizer(hf, hf_sd, layout, kwargs, distributed_optimizer)
        if check_against is None:
            optimizer = GradientRecorder(optimizer, model.module, hf)
        before = {}
        for i, micro_batches in enumerate(steps):
            if i == len(steps) - 1:
                before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
            assert train_step(model, optimizer, micro_batches)["update_ok"]
        if variant == "mofo" and tp > 1:
            out["mofo_selection_exact"] = _last_step_selected_top_k(model, wrapper.optimizer, before, kwargs)
        if check_against is None:
            out[variant], out[f"{variant}_grads"] = model_to_hf(model.module, hf), optimizer.grads
            continue
        diffs = param_differences(model.module, check_against[variant], hf, layout)
        out[variant] = max(d.max().item() for d in diffs)
        out[f"{variant}_beyond_tol"] = sum(int((d > TOL).sum()) for d in diffs) / sum(d.numel() for d in diffs)
    shutdown()
    return out


def step_on_recorded_gradients(hf, hf_sd, reference, tp, pp):
    """Each variant steps its megatron optimizer (grad-norm clipping included) on the one-process run's
    recorded gradients, this rank's shard of them put into each main_grad in place of a backward pass.
    Returns, per variant, the max |param - reference| over this rank's parameters."""
    from replay_megatron.platform.distributed import initialize, shutdown

    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    out = {}
    for variant, kwargs in VARIANTS.items():
        model, optimizer, _ = _model_and_optimizer(hf, hf_sd, layout, kwargs, False)
        for grads in reference[f"{variant}_grads"]:
            model.zero_grad_buffer()
            optimizer.zero_grad()
            set_main_grads_from_hf(model.module, grads, hf, layout)
            assert optimizer.step()[0]
        out[variant] = max(d.max().item() for d in param_differences(model.module, reference[variant], hf, layout))
    shutdown()
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
    [ref] = run_local(run_variants, 1, hf, sd, [steps], 1, 1, False)
    for variant in VARIANTS:
        ref_sd = ref[variant]
        changed = {k: (ref_sd[k] != sd[k]).float().mean().item() for k in ref_sd}
        assert max((ref_sd[k] - sd[k]).abs().max().item() for k in ref_sd) > 1e-3, variant
        if variant == "mofo":  # 5 steps of a 20% selection leave most matrix entries where they were
            assert 0.2 <= changed["model.layers.0.mlp.down_proj.weight"] < 0.9, changed
            assert changed["model.norm.weight"] == 1.0
    return hf, sd, steps, ref


@pytest.mark.multiproc
def test_tp2_pp2_baselines_equal_single_process(setup):
    hf, sd, steps, ref = setup
    for out in run_local(run_variants, 4, hf, sd, [steps], 2, 2, False, ref):
        assert out["mofo_selection_exact"]
        assert out["tam_cosine"] < TOL, out
        assert out["mofo_beyond_tol"] < 1e-3, out  # threshold swaps only (see the module doc)


@pytest.mark.multiproc
def test_tp2_pp2_baselines_on_the_same_gradients_equal_single_process(setup):
    hf, sd, _, ref = setup  # the fixture checked that the reference moved (MoFO: 20%-90% of a matrix)
    for out in run_local(step_on_recorded_gradients, 4, hf, sd, ref, 2, 2):
        assert max(out[v] for v in VARIANTS) < TOL, out


@pytest.mark.multiproc
def test_dp2_distributed_optimizer_baselines_equal_single_process(setup):
    hf, sd, steps, ref = setup
    per_rank = [[[step[r]] for step in steps] for r in range(2)]
    for out in run_local(run_variants, 2, hf, sd, per_rank, 1, 1, True, ref):
        assert max(out[v] for v in VARIANTS) < TOL, out
