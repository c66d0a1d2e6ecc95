"""MoClip's Triton kernels (kernels/moclip.py) equal SPEC.md and the PyTorch paths, on CPU via TRITON_INTERPRET=1.

As in test_kernels_restricted_ce.py, the comparisons run in one spawned process that has TRITON_INTERPRET=1
before anything imports triton. Covered: the flat float64 SPEC reference over 20 steps (1e-6; both clip
modes, clipping on some steps only and for <m, g> of either sign, Adam-atan2 with a != b), the PyTorch
per-tensor path (two param groups, Adam's eps variant, beside a bf16 and a non-contiguous parameter that
stay on the PyTorch path),
a grid capped below the number of blocks (kernels/grid.py: programs loop), and the three global sums on
ragged tensor sizes (an empty tensor included) against float64.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from replay_megatron.optim import MoClip
from replay_megatron.platform.spawn import run_local
from moclip_fixtures import assert_clips_some_steps_of_either_sign, run_against_reference, train_mixed_case

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REFERENCE_CASES = [  # (MoClip kwargs, Reference kwargs)
    (dict(max_angle=70.0, mode="paper"), dict(max_angle=70.0, mode="paper")),
    (dict(max_angle=80.0, mode="rotate"), dict(max_angle=80.0, mode="rotate")),
    (dict(max_angle=180.0, atan2_a=1.27, atan2_b=0.5), dict(a=1.27, b=0.5)),
]


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def _kernels_vs_references() -> dict[str, object]:
    from replay_megatron_kernels.moclip import global_sums

    out: dict[str, object] = {}
    for moclip_kwargs, ref_kwargs in REFERENCE_CASES:  # run_against_reference asserts 1e-6 itself
        opt, ref, cos = run_against_reference(20, {**moclip_kwargs, "fused": True}, ref_kwargs)
        assert all(b.path == "fused" for b in opt._buckets()[0])
        out[f"reference {moclip_kwargs}"] = (ref.clipped, cos, ref.cos)
    for extra in ({}, {"eps": 1e-8}):
        fused, fused_stats = train_mixed_case(fused=True, **extra)
        plain, plain_stats = train_mixed_case(fused=False, **extra)
        out[f"paths {extra}"] = (_max_abs_diff(fused, plain), fused_stats, plain_stats)
    from replay_megatron_kernels import grid
    grid.MAX_PROGRAMS = 2  # (Ascend caps grids) every program loops over several blocks from here on
    for fused in (True, False):
        big = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5000))
        opt = MoClip([big], lr=1e-2, weight_decay=0.1, max_angle=30.0, fused=fused)
        for step in range(4):
            big.grad = torch.randn(5000, generator=torch.Generator().manual_seed(step))
            opt.step()
        out[f"capped grid fused={fused}"] = (big.detach().clone(), opt.last_stats.as_floats())
    gen = torch.Generator().manual_seed(0)
    sizes = (4096 * 2 + 5, 1, 4096, 33, 0)
    ms = [torch.randn(n, generator=gen) for n in sizes]
    gs = [torch.randn(n, generator=gen) for n in sizes]
    m, g = torch.cat(ms).double(), torch.cat(gs).double()
    out["sums"] = (global_sums(ms, gs, first=False), global_sums(ms, gs, first=True),
                   torch.stack([m @ g, m @ m, g @ g]))
    return out


def test_kernels_equal_references_under_interpreter():
    (out,) = run_local(_kernels_vs_references, 1, env={"TRITON_INTERPRET": "1"})
    for moclip_kwargs, _ in REFERENCE_CASES:
        clipped, cos, ref_cos = out[f"reference {moclip_kwargs}"]
        if moclip_kwargs["max_angle"] < 180:  # (the Adam-atan2 reference has no clip code, hence no cos)
            torch.testing.assert_close(torch.tensor(cos, dtype=torch.float64),
                                       torch.tensor(ref_cos, dtype=torch.float64), rtol=0, atol=1e-6, equal_nan=True)
            assert_clips_some_steps_of_either_sign(moclip_kwargs["mode"], ref_cos, clipped)
    for extra in ({}, {"eps": 1e-8}):
        diff, fused_stats, plain_stats = out[f"paths {extra}"]
        assert diff < 1e-6, (extra, diff)
        assert fused_stats["clipped_steps"] == plain_stats["clipped_steps"] > 0
        assert fused_stats["cos_phi"] == pytest.approx(plain_stats["cos_phi"], abs=1e-6)
        assert fused_stats["grad_norm"] == pytest.approx(plain_stats["grad_norm"], rel=1e-6)
    (fused, fused_stats), (plain, plain_stats) = out["capped grid fused=True"], out["capped grid fused=False"]
    assert (fused - plain).abs().max().item() < 1e-6
    assert fused_stats["clipped_steps"] == plain_stats["clipped_steps"] > 0
    assert fused_stats["cos_phi"] == pytest.approx(plain_stats["cos_phi"], abs=1e-6)
    sums, first, exact = out["sums"]
    torch.testing.assert_close(sums, exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(first, torch.tensor([0.0, 0.0, exact[2].item()], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_fused_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        MoClip([torch.nn.Parameter(torch.zeros(3))], fused=True)
