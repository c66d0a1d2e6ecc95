"""Launch grids of the kernels: at most `MAX_PROGRAMS` programs, each looping over its share of the work.

Ascend's runtime refuses a launch of more than 65535 blocks (the product of the grid's dimensions), and a
Stage 1 micro-batch (positions) or an embedding's optimizer step (elements / block) easily exceeds it.
So every kernel here runs a grid-stride loop and is launched on `capped_grid`; where the work fits (and
on CUDA, mostly) the loop runs once per program.
"""
from __future__ import annotations

MAX_PROGRAMS = 65535


def capped_grid(units: int) -> tuple[int]:
    """A 1-D grid for `units` work items (positions, element blocks), never above `MAX_PROGRAMS`."""
    return (max(1, min(units, MAX_PROGRAMS)),)
