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
import math

import pytest
import torch

from replay_megatron.optim import MoClip
from replay_megatron.optim import moclip as moclip_module

TOL = 1e-6


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)


def backward(model: torch.nn.Module, step: int) -> None:
    x, y = batch(step)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weights with weight decay, biases without and at a different lr (as megatron-core builds groups)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "lr": 1e-2, "weight_decay": 0.1}, {"params": biases, "lr": 5e-3, "weight_decay": 0.0}]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


class Reference:
    """SPEC.md section 3 on one flat float64 vector; `max_angle=None` is plain Adam-atan2 (no clip code)."""

    def __init__(self, theta, lr, wd, *, betas=(0.9, 0.999), max_angle=None, mode="paper", a=1.0, b=1.0):
        self.theta, self.lr, self.wd = theta.clone(), lr, wd
        self.m, self.v, self.t = torch.zeros_like(theta), torch.zeros_like(theta), 0
        self.betas, self.max_angle, self.mode, self.a, self.b = betas, max_angle, mode, a, b
        self.cos, self.clipped = [], []

    def clip(self, g: torch.Tensor) -> torch.Tensor:
        """Step 2 as SPEC words it; records cos(phi) and whether clipping fired."""
        m = self.m
        d, mm, gg = (m @ g).item(), (m @ m).item(), (g @ g).item()
        if self.t == 1 or mm == 0 or gg == 0:
            self.cos.append(math.nan)
            self.clipped.append(False)
            return g
        self.cos.append(d / math.sqrt(mm * gg))
        g_par = d / mm * m
        g_perp = g - g_par
        unit_perp = g_perp / g_perp.norm() if g_perp.norm() > 0 else torch.zeros_like(g)
        theta = math.radians(self.max_angle)
        if self.mode == "paper":  # eq. 5, either sign of d; from 90 degrees on nothing is clipped
            cap = math.inf if self.max_angle >= 90 else math.tan(theta) * g_par.norm().item()
            self.clipped.append(g_perp.norm().item() > cap)
            return g_par + min(g_perp.norm().item(), cap) * unit_perp
        phi = math.degrees(math.acos(max(-1.0, min(1.0, self.cos[-1]))))
        self.clipped.append(phi > self.max_angle)
        if phi <= self.max_angle:
            return g
        return g.norm() * (math.cos(theta) * m / m.norm() + math.sin(theta) * unit_perp)

    def step(self, g: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        if self.max_angle is not None:
            g = self.clip(g)
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        mhat, vhat = self.m / (1 - b1 ** self.t), self.v / (1 - b2 ** self.t)
        self.theta = self.theta * (1 - self.lr * self.wd)
        self.theta = self.theta - self.lr * self.a * torch.atan2(mhat, self.b * vhat.sqrt())


def run_against_reference(steps: int, moclip_kwargs: dict, ref_kwargs: dict):
    model = make_mlp()
    groups = param_groups(model)
    opt = MoClip(groups, **moclip_kwargs)
    params = [p for g in groups for p in g["params"]]
    lr = torch.cat([torch.full((p.numel(),), g["lr"], dtype=torch.float64) for g in groups for p in g["params"]])
    wd = torch.cat([torch.full((p.numel(),), g["weight_decay"], dtype=torch.float64)
                    for g in groups for p in g["params"]])
    ref = Reference(flat(params), lr, wd, **ref_kwargs)
    cos = []
    for step in range(steps):
        backward(model, step)
        ref.step(flat(p.grad for p in params))
        opt.step()
        cos.append(opt.last_stats.cos_phi.item())
        assert bool(opt.last_stats.clipped) == (ref.clipped[-1] if ref.clipped else False), f"step {step}"
    torch.testing.assert_close(flat(params), ref.theta, rtol=0, atol=TOL)
    return opt, ref, cos


def assert_clips_some_steps_of_either_sign(mode: str, cos: list[float], clipped: list[bool]) -> int:
    """The reference case clips on some steps only, with <m, g> of both signs among the clipped and (paper
    mode below 90 degrees; rotate mode clips every <m, g> < 0) the unclipped steps; returns the count."""
    n_clipped = sum(clipped)
    assert 3 <= n_clipped <= len(clipped) - 3, f"the case must clip on some steps but not all: {clipped}"
    signs = {(c > 0, fired) for c, fired in zip(cos, clipped) if not math.isnan(c)}
    assert signs == {(True, True), (True, False), (False, True)} | ({(False, False)} if mode == "paper" else set())
    return n_clipped


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


def train_mixed_case(steps: int = 10, **moclip_kwargs) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Params and moments after `steps` clipping steps over two groups, a bf16 parameter (its own bucket)
    and a non-contiguous one (updated whole, not in blocks); and the last step's statistics."""
    model = make_mlp()
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    transposed = torch.nn.Parameter(torch.eye(3, 8).t())
    opt = MoClip(param_groups(model) + [{"params": [extra, transposed]}], max_angle=30.0, **moclip_kwargs)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        out = model(x) * extra.float() + (x.repeat(1, 2)[:, :8] @ transposed)
        torch.nn.functional.mse_loss(out, y).backward()
        opt.step()
    params = [p.detach().clone() for p in [*model.parameters(), extra, transposed]]
    state = [t for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    return params + state, opt.last_stats.as_floats()


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
