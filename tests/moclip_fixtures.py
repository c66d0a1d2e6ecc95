"""Shared helpers of the MoClip tests: a small MLP, a float64 flat reference of SPEC section 3, mixed training cases."""
from __future__ import annotations

import math

import torch

from replay_megatron.optim import MoClip


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
