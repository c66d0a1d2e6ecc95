"""MoClip inside megatron-core's optimizer stack (optim.megatron.build_optimizer): 5 steps of a tiny
Qwen3 at TP2xPP2 (FP32Optimizer) and at DP2 (DistributedOptimizer, state sharded over DP) equal one
process on the same data (fp32, parameters within 1e-5; the logged global cos(phi) per step equal);
resuming the DP2 run from a megatron dist checkpoint of model + MoClip state at step 3 equals the
uninterrupted run at step 6, running clip counts included."""
import pytest
import torch

from qwen3_fixtures import hf_state_dict, tiny_hf_config, tiny_hf_model
from replay_megatron.platform.spawn import run_local
from train_fixtures import make_micro_batches, max_deviation

pytestmark = pytest.mark.mcore_compat  # CI also runs these on megatron-core 0.12.1 (README)

TOL = 1e-5
STEPS = 5
# Small enough that the angle clip fires on some of the 5 steps of this data (asserted below).
HYPER = dict(lr=1e-3, weight_decay=0.1, clip_grad=1.0, max_angle=50.0)


def run_steps(hf, hf_sd, steps, tp, pp, distributed_optimizer, check_against=None):
    """`steps` lists this DP rank's micro-batches per step. Returns the per-step MoClip stats and, at
    one process, the HF state dict after the last step; elsewhere the max |param - check_against| over
    this rank's parameter shards."""
    from replay_megatron.models.conversion import load_hf_into_model, model_to_hf
    from replay_megatron.optim.megatron import build_optimizer, moclip_optimizers
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    model = build_ddp_model(hf, layout, distributed_optimizer=distributed_optimizer)
    load_hf_into_model(model.module, hf_sd, hf, tp=tp, tp_rank=layout.tp_rank)
    model.broadcast_params()
    optimizer = build_optimizer("moclip", [model], distributed_optimizer=distributed_optimizer, **HYPER)
    [moclip] = moclip_optimizers(optimizer)
    kinds = [type(w).__name__ for w in getattr(optimizer, "chained_optimizers", [optimizer])]
    stats = []
    for micro_batches in steps:
        result = train_step(model, optimizer, micro_batches)
        assert result["update_ok"]
        stats.append(moclip.last_stats.as_floats())
    if check_against is None:
        out = (stats, kinds, model_to_hf(model.module, hf))
    else:
        out = (stats, kinds, max_deviation(model.module, check_against, hf, layout))
    shutdown()
    return out


def assert_same_stats(stats, ref_stats):
    for step, (got, want) in enumerate(zip(stats, ref_stats)):
        assert got["clipped"] == want["clipped"], step
        if step == 0:  # no momentum yet: cos(phi) undefined
            continue
        assert abs(got["cos_phi"] - want["cos_phi"]) < TOL, (step, got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) < TOL * max(1.0, want["grad_norm"]), step


@pytest.fixture(scope="module")
def setup():
    hf = tiny_hf_config("qwen3-tiny")
    sd = hf_state_dict(tiny_hf_model(hf))
    batches = make_micro_batches(hf, n=2 * STEPS)
    steps = [batches[2 * i: 2 * i + 2] for i in range(STEPS)]
    [(ref_stats, ref_type, ref_sd)] = run_local(run_steps, 1, hf, sd, steps, 1, 1, False)
    assert ref_type == ["FP32Optimizer"]
    fired = [s["clipped"] for s in ref_stats]
    assert any(fired) and not all(fired), fired  # the clip fires on some steps, not all
    assert max((ref_sd[k] - sd[k]).abs().max().item() for k in ref_sd) > 1e-3
    return hf, sd, steps, ref_stats, ref_sd


@pytest.mark.multiproc
def test_tp2_pp2_moclip_equals_single_process(setup):
    hf, sd, steps, ref_stats, ref_sd = setup
    for stats, kind, deviation in run_local(run_steps, 4, hf, sd, steps, 2, 2, False, ref_sd):
        assert kind == ["FP32Optimizer"]
        assert_same_stats(stats, ref_stats)
        assert deviation < TOL


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 2])
def test_dp2_distributed_optimizer_equals_single_process(setup, tp):
    """DP2 (and TP2 x DP2: TP-duplicated norm shards counted once) with the distributed optimizer."""
    hf, sd, steps, ref_stats, ref_sd = setup
    per_rank = [[[step[r]] for step in steps] for r in range(2)]
    results = run_local(run_dp_rank, 2 * tp, hf, sd, per_rank, ref_sd, tp)
    for stats, kind, deviation in results:
        assert kind == ["DistributedOptimizer"]
        assert_same_stats(stats, ref_stats)
        assert deviation < TOL


def run_dp_rank(hf, hf_sd, per_rank_steps, check_against, tp):
    """DP rank r trains on micro-batch r of every step (the single process saw both); megatron's rank
    order puts TP innermost, so the DP rank is RANK // tp."""
    import os

    steps = per_rank_steps[int(os.environ["RANK"]) // tp]
    return run_steps(hf, hf_sd, steps, tp, 1, True, check_against)


def resume_run(hf, hf_sd, per_rank_steps, directory, distributed):
    """TP1 PP1, DP = len(per_rank_steps), with or without the distributed optimizer: 6 uninterrupted
    steps, saving model + optimizer after step 3; then a fresh model and optimizer load that checkpoint
    and take steps 4-6. Returns both runs' stats of
    steps 4-6, the max |param difference| after step 6 and both optimizers' running clip counts."""
    import os

    from megatron.core import dist_checkpointing

    from replay_megatron.mcore_compat import optimizer_sharded_state_dict
    from replay_megatron.models.checkpoint import _sync_torch_dist_strategy
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.optim.megatron import build_optimizer, load_optimizer_state, moclip_optimizers
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    steps = per_rank_steps[int(os.environ["RANK"])]
    layout = initialize(device="cpu", tp=1, pp=1, num_layers=hf["num_hidden_layers"])

    def fresh():
        model = build_ddp_model(hf, layout, distributed_optimizer=distributed)
        load_hf_into_model(model.module, hf_sd, hf, tp=1, tp_rank=layout.tp_rank)
        model.broadcast_params()
        return model, build_optimizer("moclip", [model], distributed_optimizer=distributed, **HYPER)

    def run(model, optimizer, micro_batches):
        [moclip] = moclip_optimizers(optimizer)
        stats = []
        for mb in micro_batches:
            train_step(model, optimizer, mb)
            stats.append(moclip.last_stats.as_floats())
        return stats

    def sharded(model, optimizer, is_loading):
        model_sd = model.module.sharded_state_dict()
        return {"model": model_sd, "optimizer": optimizer_sharded_state_dict(optimizer, model_sd, is_loading)}

    model, optimizer = fresh()
    run(model, optimizer, steps[:3])
    dist_checkpointing.save(sharded(model, optimizer, False), directory,
                            sharded_strategy=_sync_torch_dist_strategy())
    straight = run(model, optimizer, steps[3:])

    resumed_model, resumed_optimizer = fresh()  # initial weights, empty optimizer state
    state = dist_checkpointing.load(sharded(resumed_model, resumed_optimizer, True), directory)
    resumed_model.module.load_state_dict(state["model"])
    load_optimizer_state(resumed_optimizer, state["optimizer"])
    resumed = run(resumed_model, resumed_optimizer, steps[3:])
    params = dict(model.module.named_parameters())
    dev = max((p.detach() - params[n].detach()).abs().max().item()
              for n, p in resumed_model.module.named_parameters())
    counts = [moclip_optimizers(o)[0].clip_counts for o in (optimizer, resumed_optimizer)]
    shutdown()
    return straight, resumed, dev, counts


@pytest.mark.multiproc
@pytest.mark.parametrize("dp,distributed", [(2, True), (1, False)])
def test_resume_from_step3_checkpoint_equals_uninterrupted_run(tmp_path, dp, distributed):
    hf = tiny_hf_config("qwen3-tiny")
    sd = hf_state_dict(tiny_hf_model(hf))
    batches = make_micro_batches(hf, n=12)
    per_rank = [[batches[2 * i + r: 2 * i + 2: dp] for i in range(6)] for r in range(dp)]
    for straight, resumed, deviation, counts in run_local(resume_run, dp, hf, sd, per_rank, str(tmp_path), distributed):
        assert any(s["clipped"] for s in straight)
        assert_same_stats(resumed, straight)
        assert deviation < 1e-6
        assert counts[1] == counts[0] and counts[0]["steps"] == 6  # the running clip counts resume too


def build_variants(hf, hf_sd, micro_batches):
    """One process: the wrapper megatron-core builds around each optimizer and dtype, the inner optimizer,
    whether `torch.optim`'s names are restored afterwards, and one bf16 MoClip step's state dtypes."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.optim.megatron import build_optimizer, moclip_optimizers
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    layout = initialize(device="cpu", tp=1, pp=1, num_layers=hf["num_hidden_layers"])
    out = {}
    for name, dtype, distributed in [("moclip", "bf16", False), ("adam-atan2", "fp32", False),
                                     ("adamw", "fp32", True), ("moclip", "bf16", True)]:
        model = build_ddp_model(hf, layout, params_dtype=dtype, distributed_optimizer=distributed)
        load_hf_into_model(model.module, hf_sd, hf, tp=1, tp_rank=0)
        optimizer = build_optimizer(name, [model], lr=1e-3, params_dtype=dtype,
                                    distributed_optimizer=distributed, max_angle=30.0)
        [wrapper] = optimizer.chained_optimizers
        moclips = moclip_optimizers(optimizer)
        row = {"wrapper": type(wrapper).__name__, "inner": "MoClip" if moclips else type(wrapper.optimizer).__name__,
               "max_angle": [m.max_angle for m in moclips]}
        if moclips and dtype == "bf16":
            # megatron's scheduler sets each group's lr and weight decay (wd_mult 0: norms, biases)
            OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=10, wd_incr_style="constant").step(1)
            result = train_step(model, optimizer, micro_batches)
            [moclip] = moclips
            # (lr, weight decay, dims) per parameter; DP shards are flat, so dims only without them
            row["lr_wd"] = sorted({(g["lr"], g["weight_decay"], 0 if distributed else p.dim())
                                   for g in moclip.param_groups for p in g["params"]})
            row["update_ok"] = result["update_ok"]
            row["main_dtypes"] = sorted({str(p.dtype) for g in moclip.param_groups for p in g["params"]})
            row["state_dtypes"] = sorted({str(s[k].dtype) for s in moclip.state.values()
                                          for k in ("exp_avg", "exp_avg_sq")})
            row["counted"] = sum(moclip.counts_toward_stats(p) for g in moclip.param_groups for p in g["params"])
            row["params"] = sum(len(g["params"]) for g in moclip.param_groups)
        out[(name, dtype, distributed)] = row
    out["restored"] = torch.optim.AdamW.__name__ == "AdamW" and torch.optim.Adam.__name__ == "Adam"
    shutdown()
    return out


@pytest.mark.multiproc
def test_wrappers_around_each_optimizer():
    hf = tiny_hf_config("qwen3-tiny")
    sd = hf_state_dict(tiny_hf_model(hf))
    [out] = run_local(build_variants, 1, hf, sd, make_micro_batches(hf))
    assert out.pop("restored")
    mixed = out[("moclip", "bf16", False)]
    assert (mixed["wrapper"], mixed["inner"]) == ("Float16OptimizerWithFloat16Params", "MoClip")
    assert out[("adam-atan2", "fp32", False)] == {"wrapper": "FP32Optimizer", "inner": "MoClip",
                                                   "max_angle": [180.0]}
    assert out[("adamw", "fp32", True)]["wrapper"] == "DistributedOptimizer"
    assert (out[("adamw", "fp32", True)]["inner"], out[("adamw", "fp32", True)]["max_angle"]) == ("AdamW", [])
    sharded = out[("moclip", "bf16", True)]
    assert (sharded["wrapper"], sharded["inner"], sharded["max_angle"]) == ("DistributedOptimizer", "MoClip", [30.0])
    for row in (mixed, sharded):  # MoClip holds fp32 main params (or their DP shards) and fp32 moments
        assert row["update_ok"] and row["main_dtypes"] == ["torch.float32"] == row["state_dtypes"]
        assert row["counted"] == row["params"]  # one process: no duplicates to leave out
    # warm-up step 1 of 2: lr = max_lr/2; weight decay on matrices only (norm weights are 1-dim)
    assert mixed["lr_wd"] == [(5e-4, 0.0, 1), (5e-4, 0.1, 2)]
    assert sharded["lr_wd"] == [(5e-4, 0.0, 0), (5e-4, 0.1, 0)]
