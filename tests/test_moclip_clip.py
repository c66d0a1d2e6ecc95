"""Property tests of MoClip's clip and update (SPEC.md section 3) on random vectors (hypothesis).

The clip math is checked in float64 against the geometry it promises: after clipping the angle to the
previous momentum is exactly the cap (so <= max_angle, paper Lemma 2), g is untouched within the cap,
paper and rotate modes give the same angle, and an exactly opposite g becomes 0. The optimizer is
checked for Lemma 3 (|update_i| <= lr*a*pi/2 before weight decay) and for finite updates when the
gradient or the momentum is zero.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_megatron.optim import MoClip
from replay_megatron.optim.clip import clip_coefficients

ANGLE_TOL_DEG = 1e-4
SETTINGS = settings(max_examples=100, deadline=None)

coord = st.floats(-100.0, 100.0, allow_nan=False, allow_subnormal=False).map(lambda x: 0.0 if abs(x) < 1e-3 else x)
cap = st.one_of(st.sampled_from([30.0, 45.0, 60.0, 90.0, 135.0, 180.0]), st.floats(1.0, 179.0))


@st.composite
def momentum_and_grad(draw):
    """(m, g) float64 vectors: independent, or g a multiple of m (parallel/opposite), or zeros."""
    n = draw(st.integers(2, 12))
    vec = st.lists(coord, min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64))
    m = draw(vec)
    kind = draw(st.sampled_from(["free", "multiple", "zero"]))
    if kind == "multiple":
        g = m * draw(st.sampled_from([-2.0, -1.0, -0.5, 0.5, 3.0]))
    elif kind == "zero":
        g = torch.zeros(n, dtype=torch.float64)
    else:
        g = draw(vec)
    return m, g


def angle_deg(u: torch.Tensor, w: torch.Tensor) -> float:
    cos = (u @ w / (u.norm() * w.norm())).clamp(-1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


def clipped_grad(m: torch.Tensor, g: torch.Tensor, max_angle: float, mode: str):
    c = clip_coefficients(m @ g, m @ m, g @ g, max_angle, mode)
    return c, c.alpha * g + c.beta * m


@SETTINGS
@given(momentum_and_grad(), cap)
def test_clip_caps_the_angle_and_leaves_small_angles_alone(mg, max_angle):
    m, g = mg
    defined = bool(m.norm() > 0 and g.norm() > 0)
    angles = {}
    for mode in ("paper", "rotate"):
        c, gp = clipped_grad(m, g, max_angle, mode)
        if not c.clipped:
            assert c.alpha.item() == 1.0 and c.beta.item() == 0.0  # g' = g, bit for bit
            assert not defined or angle_deg(m, g) <= max_angle + ANGLE_TOL_DEG
            continue
        assert defined and angle_deg(m, g) > max_angle - ANGLE_TOL_DEG
        if c.opposite:  # exactly opposite: nothing of g survives
            assert angle_deg(m, g) > 179.9 and torch.count_nonzero(gp) == 0
            angles[mode] = None
            continue
        angles[mode] = angle_deg(m, gp)
        assert abs(angles[mode] - max_angle) <= ANGLE_TOL_DEG  # Lemma 2, with equality at the cap
        assert abs(c.clipped_grad_norm.item() - gp.norm().item()) <= 1e-9 * max(1.0, gp.norm().item())
        if mode == "rotate":
            torch.testing.assert_close(gp.norm(), g.norm(), rtol=1e-9, atol=0)
    if len(angles) == 2 and None not in angles.values():
        assert abs(angles["paper"] - angles["rotate"]) <= ANGLE_TOL_DEG
    else:
        assert len(angles) in (0, 2)  # both modes agree on whether (and how) to clip


@st.composite
def update_case(draw):
    n = draw(st.integers(2, 8))
    vec = st.lists(coord, min_size=n, max_size=n)
    grads = draw(st.lists(st.one_of(st.just([0.0] * n), vec), min_size=1, max_size=4))
    return draw(vec), grads


@SETTINGS
@given(update_case(), cap, st.sampled_from(["paper", "rotate"]), st.floats(0.5, 2.0), st.floats(0.1, 10.0),
       st.sampled_from([1e-3, 0.1]))
def test_update_is_bounded_and_finite(case, max_angle, mode, a, b, lr):
    theta0, grads = case
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float32))
    opt = MoClip([p], lr=lr, max_angle=max_angle, mode=mode, atan2_a=a, atan2_b=b)
    bound = lr * a * math.pi / 2 * (1 + 1e-6)
    for grad in grads:
        before = p.detach().clone()
        p.grad = torch.tensor(grad, dtype=torch.float32)
        opt.step()
        assert torch.isfinite(p).all()
        assert (p.detach() - before).abs().max().item() <= bound  # Lemma 3
        assert torch.isfinite(opt.last_stats.clipped_grad_norm)
