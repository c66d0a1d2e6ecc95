"""Triton kernels of MoClip (SPEC.md section 3); reference: the PyTorch paths of replay_megatron.optim.moclip.

Two passes over memory per step instead of the ~25 of the multi-tensor path: `global_sums` reads g and m
once for the partials of <m, g>, |m|^2 and |g|^2 (fp32 per block, float64 across blocks and tensors), and
`update_` reads g, m, v, theta once and writes m, v, theta: g' = alpha*g + beta*m (alpha, beta stay on the
device: no host sync), Adam moments, atan2 (or Adam's division with eps), decoupled weight decay. All
tensors are fp32, as megatron's main parameters are (the caller keeps low-precision parameters on its
PyTorch path: Triton's interpreter truncates fp32 -> bf16 where GPUs round, so a bf16 store could not be
tested here). atan2 is written with core `tl` operations (Cephes' atanf polynomial, ~2 ulp),
so the kernel needs no backend math library: it runs on CUDA, on Ascend NPUs through triton-ascend, and on
CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from replay_megatron_kernels.grid import capped_grid

SUMS_BLOCK = 4096
UPDATE_BLOCK = 1024


@triton.jit
def _global_sums_kernel(g_ptr, m_ptr, out_ptr, n, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    dot = tl.zeros([], tl.float32)
    mm = tl.zeros([], tl.float32)
    gg = tl.zeros([], tl.float32)
    for start in range(pid.to(tl.int64) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < n
        g = tl.load(g_ptr + offs, mask=live, other=0.0)
        gg += tl.sum(g * g, axis=0)
        if not FIRST:  # on the first step m_0 = 0
            m = tl.load(m_ptr + offs, mask=live, other=0.0)
            dot += tl.sum(m * g, axis=0)
            mm += tl.sum(m * m, axis=0)
    tl.store(out_ptr + pid * 3, dot)
    tl.store(out_ptr + pid * 3 + 1, mm)
    tl.store(out_ptr + pid * 3 + 2, gg)


@triton.jit
def _atan_of_nonnegative(x):
    """atan(x) for x in [0, inf] (Cephes atanf: two range reductions, a degree-9 odd polynomial)."""
    big = x > 2.414213562373095  # tan(3 pi / 8)
    mid = x > 0.41421356237309503  # tan(pi / 8)
    offset = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    xr = tl.where(big, -1.0 / x, tl.where(mid, (x - 1.0) / (x + 1.0), x))
    z = xr * xr
    poly = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z
    return offset + (poly * xr + xr)


@triton.jit
def _update_kernel(p_ptr, g_ptr, m_ptr, v_ptr, alpha_ptr, beta_ptr, n, lerp_weight, beta2, sq_weight,
                   atan2_scale, bias_correction1, bias_correction2_sqrt, eps, step_size, keep,
                   CLIP: tl.constexpr, ATAN2: tl.constexpr, BLOCK: tl.constexpr):
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < n
        g = tl.load(g_ptr + offs, mask=live, other=0.0)
        m = tl.load(m_ptr + offs, mask=live, other=0.0)
        v = tl.load(v_ptr + offs, mask=live, other=0.0)
        if CLIP:
            g = tl.load(alpha_ptr) * g + tl.load(beta_ptr) * m
        m = m + lerp_weight * (g - m)  # torch.lerp's form for weights below 0.5
        v = v * beta2 + sq_weight * (g * g)
        tl.store(m_ptr + offs, m, mask=live)
        tl.store(v_ptr + offs, v, mask=live)
        root = tl.sqrt(v)
        if ATAN2:  # atan2(m, c*sqrt(v)) with c*sqrt(v) >= 0: sign(m) * atan(|m| / (c*sqrt(v))), atan2(0, 0) = 0
            mag = tl.abs(m)
            angle = _atan_of_nonnegative(tl.where(mag == 0.0, 0.0, mag / (atan2_scale * root)))
            step = tl.where(m < 0.0, -angle, angle)
        else:
            step = m / (bias_correction1 * (root / bias_correction2_sqrt + eps))
        p = tl.load(p_ptr + offs, mask=live, other=0.0)
        tl.store(p_ptr + offs, p * keep - step_size * step, mask=live)


def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous() or t.dtype != torch.float32:
        raise ValueError(f"MoClip Triton kernel: {name} must be contiguous fp32, got {t.dtype} "
                         f"{'contiguous' if t.is_contiguous() else 'non-contiguous'} {tuple(t.shape)}")
    return t.view(-1)


def global_sums(exp_avgs: list[torch.Tensor], grads: list[torch.Tensor], first: bool) -> torch.Tensor:
    """[<m, g>, |m|^2, |g|^2] over the tensor lists, float64, on their device (no host sync)."""
    grids = [capped_grid(triton.cdiv(g.numel(), SUMS_BLOCK)) for g in grads]
    partials = torch.empty(sum(grid[0] for grid in grids), 3, dtype=torch.float32, device=grads[0].device)
    start = 0
    for m, g, grid in zip(exp_avgs, grads, grids):  # a program's partials: its blocks' fp32 sums
        _global_sums_kernel[grid](_flat(g, "grad"), _flat(m, "exp_avg"), partials[start:start + grid[0]],
                                  g.numel(), FIRST=first, BLOCK=SUMS_BLOCK)
        start += grid[0]
    return partials.double().sum(0)


def update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
            clip: Optional[tuple[torch.Tensor, torch.Tensor]], *, beta1: float, beta2: float,
            atan2_scale: float, bias_correction1: float, bias_correction2_sqrt: float, eps: Optional[float],
            step_size: float, decay: float) -> None:
    """SPEC section 3 steps 2-6 on one tensor, in place. `clip`: fp32 0-dim (alpha, beta) on the device,
    None for g' = g. `eps` None: theta -= step_size*atan2(m, atan2_scale*sqrt(v)); else Adam's
    theta -= step_size * m / (bc1 * (sqrt(v)/sqrt(bc2) + eps)). All four tensors contiguous fp32."""
    n = param.numel()
    if n == 0:
        return
    flat = [_flat(t, name) for t, name in ((param, "param"), (grad, "grad"), (exp_avg, "exp_avg"),
                                            (exp_avg_sq, "exp_avg_sq"))]
    alpha, beta = clip if clip is not None else (flat[2], flat[2])  # unread when CLIP is off
    _update_kernel[capped_grid(triton.cdiv(n, UPDATE_BLOCK))](
        *flat, alpha, beta, n, 1.0 - beta1, beta2, 1.0 - beta2, atan2_scale, bias_correction1,
        bias_correction2_sqrt, 0.0 if eps is None else eps, step_size, 1.0 - decay,
        CLIP=clip is not None, ATAN2=eps is None, BLOCK=UPDATE_BLOCK)
