"""Elementwise building blocks shared by MoClip and the baseline optimizers: multi-tensor or per-tensor
ops with identical numbers, Adam's bias corrections, the decoupled update in fp32, the float64 statistics
of MoClip's angle, and the Triton kernels where they import."""
from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any, Callable, Optional

import torch
from torch import Tensor

# CPU work unit of the per-tensor path and of the statistics: 1 MiB of fp32 per tensor, so one block's
# g, m, v, theta and the temporary stay in L2/L3 through the whole update (each op re-reads the block).
CPU_BLOCK_NUMEL = 1 << 18


def each(foreach: bool, op: str, *args: Any, **kwargs: Any) -> Any:
    """`torch._foreach_<op>` over tensor lists, or the same op tensor by tensor (identical numbers).

    List arguments are zipped; anything else (a number, a 0-dim tensor) is passed to every call.
    """
    if foreach:
        return getattr(torch, f"_foreach_{op}")(*args, **kwargs)
    n = len(args[0])
    columns = [a if isinstance(a, list) else [a] * n for a in args]
    method = getattr(Tensor, op)
    return [method(*row, **kwargs) for row in zip(*columns)]


def run_closure(closure: Optional[Callable[[], float]]) -> Optional[float]:
    """torch's optimizer closure protocol: re-evaluate the loss with gradients enabled, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def decoupled_update_(params: list[Tensor], updates: list[Tensor], step_size: float, decay: float,
                      foreach: bool = False) -> None:
    """`theta = theta*(1 - decay) - step_size*update` (SPEC section 3 steps 5-6), computed in fp32.

    Low-precision parameters are updated in an fp32 copy and rounded once to their dtype.
    """
    work = params if params[0].dtype == torch.float32 else [p.float() for p in params]
    if decay != 0.0:
        each(foreach, "mul_", work, 1.0 - decay)
    each(foreach, "add_", work, updates, alpha=-step_size)
    if work is not params:
        each(foreach, "copy_", params, work)


@functools.lru_cache(maxsize=None)
def fused_kernels() -> Optional[ModuleType]:
    """`replay_megatron_kernels.moclip` (the Triton kernels), or None where triton does not import."""
    try:
        from replay_megatron_kernels import moclip as kernels
    except ImportError:
        return None
    return kernels


def bias_corrections(betas: tuple[float, float], t: float) -> tuple[float, float]:
    """Adam's (1 - b1^t, sqrt(1 - b2^t))."""
    return 1.0 - betas[0] ** t, math.sqrt(1.0 - betas[1] ** t)


def flat_blocks(tensor: Tensor, block_numel: int) -> list[Tensor]:
    """`tensor` flattened (a copy if not contiguous) in slices of at most `block_numel` elements."""
    flat = tensor.reshape(-1)
    return [flat[i:i + block_numel] for i in range(0, flat.numel(), block_numel)] or [flat]


def local_sums(ms: list[Tensor], gs: list[Tensor], first: bool, block_numel: int = CPU_BLOCK_NUMEL) -> Tensor:
    """[<m, g>, |m|^2, |g|^2] of matching tensor lists in float64 (m ignored when `first`: m_0 = 0).

    Accelerators: whole-tensor fp32 reductions (tree reductions), multi-tensor for both update paths so
    that they see the same sums. CPU: fp32 dots over blocks of `block_numel`, summed
    in float64 (CPU's long fp32 reductions drift), reading each block of g and m once for all three.
    """
    if gs[0].device.type != "cpu":
        gg = torch.stack(torch._foreach_norm(gs)).double().square().sum()
        if first:
            return torch.stack([torch.zeros_like(gg), torch.zeros_like(gg), gg])
        d = torch.stack([torch.dot(m.reshape(-1), g.reshape(-1)) for m, g in zip(ms, gs)]).double().sum()
        mm = torch.stack(torch._foreach_norm(ms)).double().square().sum()
        return torch.stack([d, mm, gg])
    parts = []
    for m, g in zip(ms, gs):
        for mb, gb in zip(flat_blocks(m, block_numel), flat_blocks(g, block_numel)):
            gg = torch.dot(gb, gb)
            parts.append(torch.stack([torch.zeros_like(gg), torch.zeros_like(gg), gg]) if first else
                         torch.stack([torch.dot(mb, gb), torch.dot(mb, mb), gg]))
    return torch.stack(parts).double().sum(0)
