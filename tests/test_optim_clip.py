"""Property tests of MoClip's clip and update (SPEC.md section 3) on random vectors (hypothesis).

The clip math is checked in float64 against the geometry SPEC section 3 step 2 promises. Paper mode
(eq. 5, either sign of <m, g>): the cap is active exactly when |cos(m, g)| < cos(max_angle) and never
from 90 degrees on; a clipped g' keeps g's component along m (so <m, g'> = <m, g>), lies exactly
max_angle from the line of m (|cos(m, g')| = cos(max_angle), paper Lemma 2 for <m, g> > 0) and is no
longer than g; g orthogonal to m becomes 0. Rotate mode (the ablation): the angle to m becomes exactly
max_angle, |g'| = |g|, and an exactly opposite g becomes 0. For <m, g> > 0 both modes clip the same
gradients to the same angle. The optimizer is checked for Lemma 3 (|update_i| <= lr*a*pi/2 before
weight decay) and for finite updates when the gradient or the momentum is zero.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_megatron.optim import MoClip
from replay_megatron.optim.clip import clip_coefficients

ANGLE_TOL_DEG = 1e-4
REL_TOL = 1e-9
SETTINGS = settings(max_examples=100, deadline=None)

coord = st.floats(-100.0, 100.0, allow_nan=False, allow_subnormal=False).map(lambda x: 0.0 if abs(x) < 1e-3 else x)
cap = st.one_of(st.sampled_from([30.0, 45.0, 60.0, 90.0, 135.0, 180.0]), st.floats(1.0, 179.0))


@st.composite
def momentum_and_grad(draw):
    """(m, g) float64 vectors: independent; g a multiple of m (parallel/opposite), alone or plus a
    perturbation (near either end of the line of m); g exactly orthogonal to m (disjoint supports); zeros."""
    n = draw(st.integers(2, 12))
    vec = st.lists(coord, min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64))
    m, g = draw(vec), draw(vec)
    kind = draw(st.sampled_from(["free", "multiple", "near", "orthogonal", "zero"]))
    if kind in ("multiple", "near"):
        g = m * draw(st.sampled_from([-2.0, -1.0, -0.5, 0.5, 3.0])) + (
            g * draw(st.sampled_from([0.01, 0.1, 0.5])) if kind == "near" else 0.0)
    elif kind == "orthogonal":
        first = torch.arange(n) < n // 2
        m, g = m * first, g * ~first
    elif kind == "zero":
        g = torch.zeros(n, dtype=torch.float64)
    return m, g


def angle_deg(u: torch.Tensor, w: torch.Tensor) -> float:
    cos = (u @ w / (u.norm() * w.norm())).clamp(-1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


def clipped_grad(m: torch.Tensor, g: torch.Tensor, max_angle: float, mode: str):
    c = clip_coefficients(m @ g, m @ m, g @ g, max_angle, mode)
    return c, c.alpha * g + c.beta * m


def close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, scale)


@SETTINGS
@given(momentum_and_grad(), cap)
def test_paper_clip_caps_the_angle_to_the_line_of_m_keeping_g_par(mg, max_angle):
    m, g = mg
    c, gp = clipped_grad(m, g, max_angle, "paper")
    assert not c.opposite
    if not c.clipped:
        assert c.alpha.item() == 1.0 and c.beta.item() == 0.0  # g' = g, bit for bit
        if m.norm() > 0 and g.norm() > 0 and max_angle < 90:  # within max_angle of the line of m
            assert min(angle_deg(m, g), 180.0 - angle_deg(m, g)) <= max_angle + ANGLE_TOL_DEG
        return
    assert m.norm() > 0 and g.norm() > 0 and max_angle < 90
    phi = angle_deg(m, g)
    assert min(phi, 180.0 - phi) > max_angle - ANGLE_TOL_DEG
    d, scale = (m @ g).item(), (m.norm() * g.norm()).item()
    assert close((m @ gp).item(), d, scale)  # the component along m is kept, sign included
    assert gp.norm().item() <= g.norm().item() * (1 + REL_TOL)
    assert close(c.clipped_grad_norm.item(), gp.norm().item(), g.norm().item())
    if d == 0.0:  # orthogonal: no component along m, so nothing survives the cap
        assert torch.count_nonzero(gp) == 0
        return
    expected = max_angle if d > 0 else 180.0 - max_angle  # Lemma 2 (d > 0), with equality at the cap
    assert abs(angle_deg(m, gp) - expected) <= ANGLE_TOL_DEG
    assert close(gp.norm().item(), abs(d) / m.norm().item() / math.cos(math.radians(max_angle)), g.norm().item())


@SETTINGS
@given(momentum_and_grad(), cap)
def test_rotate_clip_turns_g_to_the_cap_keeping_its_norm(mg, max_angle):
    m, g = mg
    c, gp = clipped_grad(m, g, max_angle, "rotate")
    if not c.clipped:
        assert c.alpha.item() == 1.0 and c.beta.item() == 0.0 and not c.opposite
        assert not (m.norm() > 0 and g.norm() > 0) or angle_deg(m, g) <= max_angle + ANGLE_TOL_DEG
        return
    assert m.norm() > 0 and g.norm() > 0 and angle_deg(m, g) > max_angle - ANGLE_TOL_DEG
    if c.opposite:  # exactly opposite: nothing of g survives
        assert angle_deg(m, g) > 179.9 and torch.count_nonzero(gp) == 0
        return
    assert abs(angle_deg(m, gp) - max_angle) <= ANGLE_TOL_DEG
    torch.testing.assert_close(gp.norm(), g.norm(), rtol=REL_TOL, atol=0)
    assert close(c.clipped_grad_norm.item(), gp.norm().item(), g.norm().item())


@SETTINGS
@given(momentum_and_grad(), cap)
def test_modes_agree_when_g_leans_towards_m(mg, max_angle):
    """For <m, g> > 0 eq. 5 and the rotation clip the same gradients, to the same angle max_angle."""
    m, g = mg
    if not (m @ g).item() > 0 or max_angle >= 90:
        return
    (paper, gp), (rotate, gr) = (clipped_grad(m, g, max_angle, mode) for mode in ("paper", "rotate"))
    assert bool(paper.clipped) == bool(rotate.clipped)
    if paper.clipped:
        assert abs(angle_deg(m, gp) - angle_deg(m, gr)) <= ANGLE_TOL_DEG


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
