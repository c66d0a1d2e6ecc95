"""MoClip equals SPEC.md section 3 written out plainly, and behaves as a torch optimizer should.

The reference below flattens every parameter into one float64 vector and follows SPEC section 3 line by
line (global angle, clip, Adam moments on g', bias correction, decoupled weight decay, atan2). It is fed
the gradients MoClip saw, so each step compares the optimizer math alone (tolerance 1e-6 on parameters
after 20 steps; the clip decisions and cos(phi) must match every step, in each mode with clipped and
unclipped steps of either sign of <m, g>). Also: Adam-atan2 (no clipping) and Adam(W) equivalences,
state_dict round trip, multi-tensor == per-tensor path, fp32 state for bf16 parameters. And what the clip
is for, on plain tensors against AdamW at the same lr: on zero-mean noise MoClip drifts no further, with a
steady signal it progresses as far within a factor 3.
"""
from __future__ import annotations

import io

import pytest
import torch

from replay_megatron.optim import MoClip
from replay_megatron.optim import moclip as moclip_module
from moclip_fixtures import TOL, assert_clips_some_steps_of_either_sign, backward, flat, make_mlp, param_groups, run_against_reference, train_mixed_case



















@pytest.mark.parametrize("mode,max_angle,block_numel", [("paper", 70.0, None), ("rotate", 80.0, None),
                                                        ("paper", 70.0, 7)])
def test_moclip_equals_flat_reference(monkeypatch, mode, max_angle, block_numel):
    """block_numel=7: the CPU path's blocks (statistics and update) cut every weight raggedly."""
    if block_numel is not None:
        monkeypatch.setattr(moclip_module, "CPU_BLOCK_NUMEL", block_numel)
    opt, ref, cos = run_against_reference(20, dict(max_angle=max_angle, mode=mode),
                                          dict(max_angle=max_angle, mode=mode))
    torch.testing.assert_close(torch.tensor(cos, dtype=torch.float64), torch.tensor(ref.cos, dtype=torch.float64),
                               rtol=0, atol=1e-6, equal_nan=True)
    n_clipped = assert_clips_some_steps_of_either_sign(mode, ref.cos, ref.clipped)
    assert int(opt.last_stats.clipped_steps) == n_clipped
    assert opt.last_stats.clip_rate.item() == pytest.approx(n_clipped / 20)


@pytest.mark.parametrize("max_angle,mode,a,b", [(180.0, "paper", 1.0, 1.0), (180.0, "rotate", 1.27, 0.5),
                                                (90.0, "paper", 1.0, 1.0), (135.0, "paper", 1.27, 0.5)])
def test_no_clipping_is_adam_atan2(max_angle, mode, a, b):
    """180 degrees in either mode, and paper mode from 90 degrees on, never clip: Adam-atan2."""
    opt, ref, _ = run_against_reference(20, dict(max_angle=max_angle, mode=mode, atan2_a=a, atan2_b=b),
                                        dict(a=a, b=b))
    assert int(opt.last_stats.clipped_steps) == 0


@pytest.mark.parametrize("torch_opt,weight_decay,eps", [(torch.optim.Adam, 0.0, 1e-8), (torch.optim.AdamW, 0.1, 1e-6)])
def test_eps_without_clipping_is_torch_adam(torch_opt, weight_decay, eps):
    ours, theirs = make_mlp(), make_mlp()
    opt = MoClip(ours.parameters(), lr=1e-2, weight_decay=weight_decay, max_angle=180.0, eps=eps)
    ref = torch_opt(theirs.parameters(), lr=1e-2, weight_decay=weight_decay, eps=eps)
    for step in range(10):
        for model, o in ((ours, opt), (theirs, ref)):
            backward(model, step)
            o.step()
    torch.testing.assert_close(flat(ours.parameters()), flat(theirs.parameters()), rtol=0, atol=TOL)


def train(model, opt, steps):
    for step in steps:
        backward(model, step)
        opt.step()


@pytest.mark.parametrize("counts_via", ["state_dict", "clip_counts"])
def test_state_dict_round_trip_resumes_exactly(counts_via):
    """The running clip counts travel in state_dict(), or, for a loop whose checkpoint drops them
    (megatron's distributed optimizer), through the `clip_counts` property saved beside it."""
    kwargs = dict(max_angle=30.0, weight_decay=0.05)
    straight = make_mlp()
    opt = MoClip(param_groups(straight), **kwargs)
    train(straight, opt, range(6))

    first = make_mlp()
    opt1 = MoClip(param_groups(first), **kwargs)
    train(first, opt1, range(3))
    buf = io.BytesIO()
    opt_state = opt1.state_dict()
    if counts_via == "clip_counts":
        del opt_state["moclip_counts"]
    torch.save({"model": first.state_dict(), "opt": opt_state, "counts": opt1.clip_counts}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = make_mlp(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = MoClip(param_groups(resumed), **kwargs)
    opt2.load_state_dict(saved["opt"])
    if counts_via == "clip_counts":
        assert opt2.clip_counts == {"steps": 0, "clipped_steps": 0, "opposite_steps": 0}
        opt2.clip_counts = saved["counts"]
    assert opt2.clip_counts == opt1.clip_counts
    train(resumed, opt2, range(3, 6))

    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt2.last_stats.as_floats() == opt.last_stats.as_floats()
    assert opt.last_stats.steps == 6 and int(opt.last_stats.clipped_steps) > 0
    assert opt2.clip_counts == opt.clip_counts == {"steps": 6, "clipped_steps": int(opt.last_stats.clipped_steps),
                                                   "opposite_steps": 0}




def test_foreach_and_per_tensor_paths_are_identical():
    tensors_a, stats_a = train_mixed_case(foreach=True)
    tensors_b, stats_b = train_mixed_case(foreach=False)
    assert all(torch.equal(a, b) for a, b in zip(tensors_a, tensors_b))
    assert stats_a == stats_b and stats_a["clipped_steps"] > 0


def test_statistics_of_long_tensors_keep_fp32_precision():
    """|g| and cos(phi) of a 4M-element tensor match float64 to 1e-6 (a whole-tensor fp32 reduction on
    CPU is off by ~1e-4 at this length)."""
    gen = torch.Generator().manual_seed(0)
    g1, noise = torch.randn(1 << 22, generator=gen), torch.randn(1 << 22, generator=gen)
    p = torch.nn.Parameter(torch.zeros(1 << 22))
    opt = MoClip([p], max_angle=30.0)
    p.grad = g1
    opt.step()
    m = opt.state[p]["exp_avg"].double()
    p.grad = g2 = g1 + 2.0 * noise
    opt.step()
    stats = opt.last_stats.as_floats()
    g64 = g2.double()
    assert stats["grad_norm"] == pytest.approx(g64.norm().item(), rel=1e-6)
    assert stats["cos_phi"] == pytest.approx((m @ g64 / (m.norm() * g64.norm())).item(), abs=1e-6)


def test_bf16_params_keep_fp32_state_and_round_once():
    torch.manual_seed(0)
    p16 = torch.nn.Parameter(torch.randn(64).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    opts = [MoClip([p], lr=1e-2, weight_decay=0.1) for p in (p16, p32)]
    for _ in range(3):
        g = torch.randn(64).bfloat16()
        p16.grad, p32.grad = g, g.float()
        p32.data.copy_(p16.detach().float())  # the same starting point each step
        for o in opts:
            o.step()
        assert torch.equal(p16.detach(), p32.detach().bfloat16())
    state = opts[0].state[p16]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], opts[1].state[p32]["exp_avg"])
    resumed = MoClip([torch.nn.Parameter(p16.detach().clone())], lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(opts[0].state_dict())  # torch would cast the moments to bf16 here
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(next(iter(resumed.state.values()))[key], state[key])


def test_bad_hyperparameters_are_named():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="max_angle"):
        MoClip(p, max_angle=0.0)
    with pytest.raises(ValueError, match="mode"):
        MoClip(p, mode="spin")
    with pytest.raises(ValueError, match="param group 0: eps"):
        MoClip(p, eps=1e-8, atan2_a=1.27)
    with pytest.raises(ValueError, match="betas"):
        MoClip(p, betas=(0.9, 1.0))
    opt = MoClip(p)
    with pytest.raises(ValueError, match="clip_counts: missing .'opposite_steps'"):
        opt.clip_counts = {"steps": 3, "clipped_steps": 1}
    with pytest.raises(ValueError, match="clip_counts: need .*clipped_steps <= steps"):
        opt.clip_counts = {"steps": 3, "clipped_steps": 4, "opposite_steps": 0}


def test_package_exports_the_megatron_builder_lazily():
    """`replay_megatron.optim` stays free of megatron until its builder is asked for."""
    import subprocess
    import sys

    code = ("import sys, replay_megatron.optim as optim\n"
            "assert not any(m.split('.')[0] == 'megatron' for m in sys.modules), 'megatron imported'\n"
            "from replay_megatron.optim import build_optimizer, load_optimizer_state, moclip_optimizers\n"
            "from replay_megatron.optim import megatron\n"
            "assert build_optimizer is megatron.build_optimizer\n"
            "assert load_optimizer_state is megatron.load_optimizer_state\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- what the clip is for, on plain parameters: noise is damped, a steady signal still gets through ----

def drift_and_progress(optimizer: str, signal: float, *, steps: int = 300, lr: float = 1e-3, seed: int = 0,
                       **moclip_kwargs) -> tuple[float, float]:
    """Train three plain tensors from 0 on gradients `s + noise` (s fixed, `signal` its per-element std,
    noise N(0, 1) fresh every step); returns |theta_T - theta_0| and the progress along -s, -<theta_T, s>/|s|."""
    shapes = ((64, 32), (32,), (500,))
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    gen = torch.Generator().manual_seed(seed)
    s = [signal * torch.randn(shape, generator=gen) for shape in shapes]
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw" else
           MoClip(params, lr=lr, weight_decay=0.0, **moclip_kwargs))
    for _ in range(steps):
        for p, sp in zip(params, s):
            p.grad = sp + torch.randn(p.shape, generator=gen)
        opt.step()
    theta, s_flat = flat(params), flat(s)
    return theta.norm().item(), (-(theta @ s_flat) / max(s_flat.norm().item(), 1e-30)).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_on_noise_alone_moclip_drifts_no_further_than_adamw(seed):
    """Zero-mean noise, no signal, same lr: paper-mode MoClip moves the weights less than AdamW (its cap
    shrinks the noise perpendicular to the momentum); the rotate ablation, which adds |g| cos(max_angle)
    along the momentum on each clipped step, drifts several times further."""
    adamw, _ = drift_and_progress("adamw", 0.0, seed=seed)
    for max_angle in (45.0, 60.0):
        moclip, _ = drift_and_progress("moclip", 0.0, seed=seed, max_angle=max_angle)
        assert moclip <= adamw, (max_angle, moclip, adamw)
    rotate, _ = drift_and_progress("moclip", 0.0, seed=seed, max_angle=45.0, mode="rotate")
    assert rotate > 3 * adamw, (rotate, adamw)


@pytest.mark.parametrize("signal", [0.05, 0.2, 1.0])
def test_with_a_steady_signal_moclip_progresses_like_adamw(signal):
    """A fixed gradient component under the same noise (signal-to-noise per element 0.05 to 1): paper-mode
    MoClip's progress along it is within a factor 3 of AdamW's, either way."""
    _, adamw = drift_and_progress("adamw", signal)
    _, moclip = drift_and_progress("moclip", signal, max_angle=45.0)
    assert adamw > 0 and adamw / 3 <= moclip <= 3 * adamw, (signal, moclip, adamw)
