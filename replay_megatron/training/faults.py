"""Faults a long run survives: SIGTERM (preemption) and non-finite losses or gradients.

Both are decided collectively, so every rank takes the same branch: a rank that got SIGTERM, or saw a
NaN/Inf in its gradient shard, makes all ranks checkpoint / skip the step together.
"""
from __future__ import annotations

import signal
from typing import Iterable

import torch
import torch.distributed as dist


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint was saved before raising."""


def any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True on every rank if `flag` (a bool or a 0-d tensor) is true on any rank: one MAX all-reduce of
    one element and one host sync."""
    t = (flag.to(device=device, dtype=torch.float32) if torch.is_tensor(flag)
         else torch.tensor(1.0 if flag else 0.0, device=device)).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def has_nonfinite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d bool tensor on `device`: whether any of `tensors` holds a NaN or an Inf (local, no host sync)."""
    flags = [~torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)


class TerminationFlag:
    """Records SIGTERM instead of dying, so the loop can save a checkpoint first; restores on close."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
