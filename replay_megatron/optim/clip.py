"""SPEC.md section 3, step 2: MoClip's gradient-momentum angle clip, reduced to two global scalars.

Every case of the clip is `g' = alpha * g + beta * m_{t-1}` with scalars that depend only on the three
global sums `d = <m, g>`, `mm = |m|^2`, `gg = |g|^2`, so each rank (or shard) applies it locally. The
scalars are computed here as 0-dim tensors on the sums' device: no host synchronisation.

From the sums: `g_par = (d/mm) m`, `|g_par| = |d|/sqrt(mm)`, `|g_perp|^2 = gg - d^2/mm` (clamped at 0).
- paper mode (eq. 5 with the SPEC's typo fix, either sign of d): the cap is active when
  `|g_perp| > tan(max)*|g_par|`, i.e. `|cos(phi)| < cos(max)` (never for max >= 90 degrees), and then
  `g' = g_par + tan(max)*|g_par| * g_perp/|g_perp|`: `alpha = k`, `beta = (d/mm)(1 - k)` with
  `k = tan(max)*|g_par|/|g_perp|`. The part along the line of m is kept, the perpendicular part shrinks;
- rotate mode (an ablation), when `phi > max`: `g' = |g| (cos(max) m/|m| + sin(max) g_perp/|g_perp|)`,
  i.e. `alpha = |g| sin(max)/|g_perp|`, `beta = |g| cos(max)/|m| - alpha d/mm`; `g_perp == 0` with
  `d < 0` (exactly opposite) gives `g' = 0` and the event is reported (`opposite`).

"`g_perp == 0`" is decided numerically: `|g_perp|^2 <= COLLINEAR_RTOL * |g|^2`, i.e. `g` lies within
about 0.057 degrees of the line of `m`. The sums are fp32 reductions, so a smaller `|g_perp|` is rounding
noise, and dividing by it would blow that noise up into `g'`. Such a `g` is never clipped in paper mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CLIP_MODES = ("paper", "rotate")
COLLINEAR_RTOL = 1e-6


@dataclass(frozen=True)
class AngleClip:
    """The clip of one step as 0-dim tensors: `g' = alpha*g + beta*m`, plus what the step logs."""

    alpha: Tensor
    beta: Tensor
    cos_phi: Tensor  # cos(angle(m_{t-1}, g)); NaN where undefined (m == 0 or g == 0)
    clipped: Tensor  # bool: the cap was active and g was replaced
    opposite: Tensor  # bool, rotate mode only: g exactly opposite m, so g' = 0
    clipped_grad_norm: Tensor  # |g'|, from the sums: alpha^2 gg + 2 alpha beta d + beta^2 mm


def check_clip_args(max_angle: float, mode: str) -> None:
    """Raise ValueError for an angle outside (0, 180] degrees or an unknown clip mode."""
    if not 0.0 < max_angle <= 180.0:
        raise ValueError(f"max_angle must be in (0, 180] degrees, got {max_angle}")
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")


def never_clips(max_angle: float, mode: str) -> bool:
    """Whether no gradient can be clipped: paper mode from 90 degrees on, rotate mode at 180 (Adam-atan2)."""
    return max_angle >= (90.0 if mode == "paper" else 180.0)


def clip_coefficients(d: Tensor, mm: Tensor, gg: Tensor, max_angle: float, mode: str = "paper",
                      collinear_rtol: float = COLLINEAR_RTOL) -> AngleClip:
    """SPEC section 3 step 2 from the global sums `d = <m, g>`, `mm = |m|^2`, `gg = |g|^2` (0-dim tensors)."""
    check_clip_args(max_angle, mode)
    one, zero = torch.ones_like(d), torch.zeros_like(d)
    defined = (mm > 0) & (gg > 0)
    mm_safe = torch.where(defined, mm, one)
    norm_m = mm_safe.sqrt()
    norm_g = torch.where(defined, gg, one).sqrt()
    cos_phi = torch.where(defined, (d / (norm_m * norm_g)).clamp(-1.0, 1.0), torch.full_like(d, math.nan))

    par = d / mm_safe  # g_par = par * m
    perp_sq = (gg - d * par).clamp_min(0.0)
    collinear = perp_sq <= collinear_rtol * gg
    norm_perp = torch.where(collinear, one, perp_sq.sqrt())
    theta = math.radians(max_angle)
    if mode == "paper":
        # The cap |g_perp| <= tan(max)*|g_par| is active iff |cos(phi)| < cos(max) (NaN compares False).
        clipped = defined & ~collinear & (cos_phi.abs() < math.cos(theta)) & (not never_clips(max_angle, mode))
        opposite = torch.zeros_like(clipped)
        k = math.tan(theta) * d.abs() / (norm_m * norm_perp)
        alpha_c, beta_c = k, par * (1.0 - k)
    else:
        phi = torch.rad2deg(torch.acos(cos_phi))  # NaN where undefined, and NaN > x is False
        # Collinear and pointing along m means phi == 0: nothing to clip, whatever rounding says about phi.
        clipped = defined & (phi > max_angle) & ~(collinear & (d > 0))
        opposite = clipped & collinear
        alpha_c = norm_g * math.sin(theta) / norm_perp
        beta_c = norm_g * math.cos(theta) / norm_m - alpha_c * par

    alpha = torch.where(clipped, torch.where(opposite, zero, alpha_c), one)
    beta = torch.where(clipped & ~opposite, beta_c, zero)
    clipped_sq = alpha * alpha * gg + 2.0 * alpha * beta * d + beta * beta * mm
    return AngleClip(alpha=alpha, beta=beta, cos_phi=cos_phi, clipped=clipped, opposite=opposite,
                     clipped_grad_norm=clipped_sq.clamp_min(0.0).sqrt())
