"""The Triton kernel of the restricted cross entropy equals the PyTorch op (1e-5), on CPU via TRITON_INTERPRET=1.

Triton decides at import time whether its own library functions are interpreted, so the comparison runs in
one spawned process that has TRITON_INTERPRET=1 before anything imports triton (in this pytest process
megatron or another test may already have imported it). The grid covers ragged C across several candidate
blocks, N not a multiple of anything, H not a power of two and above one H block, H=1, bf16
inputs, the KL (soft-target) form, each gradient alone, dW added into a megatron-style main_grad
(fp32 straight from the kernel; bf16 through an fp32 scratch), and a grid capped below the number of
positions (kernels/grid.py). (The kernel under TP=2 is in
test_ops_restricted_ce_tp.py.)
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from replay_megatron.ops import restricted_cross_entropy, restricted_kl_divergence
from replay_megatron.platform.spawn import run_local
from restricted_ce_fixtures import loss_and_grads, make_case, rel_err
from restricted_ce_fixtures import fused_step

# find_spec, not import: the spawned child imports this module before run_local sets TRITON_INTERPRET
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SHAPES = [  # (n, h, v, c)
    (37, 24, 53, 9),
    (5, 130, 40, 3),    # H above one 128-wide block, not a power of two
    (19, 17, 300, 70),  # C over two 64-wide candidate blocks
    (7, 1, 5, 2),       # H=1, C=2 (rows of K=1 and K=2)
]


def _compare(fn, *args, trainable=("hidden", "weight")) -> list[tuple[str, float, float]]:
    """(what, relative error of the kernel against the op, tolerance) for loss and the gradients."""
    hidden, weight, *rest = args
    ref = loss_and_grads(fn, hidden, weight, *rest, backend="torch")
    got = loss_and_grads(fn, hidden, weight, *rest, backend="triton")
    bf16 = hidden.dtype == torch.bfloat16
    out = [("loss", rel_err(got[0], ref[0]), 1e-5)]
    for name, g, r in zip(("dh", "dw"), got[1:], ref[1:]):
        assert g.dtype == r.dtype == hidden.dtype
        out.append((name, rel_err(g, r), 1e-2 if bf16 else 1e-5))  # bf16: same fp32 values, rounded
    return out


def _single_gradient(trainable: str) -> list[tuple[str, float, float]]:
    hidden, weight, candidates, targets, _ = make_case(12)
    grads = {}
    for backend in ("torch", "triton"):
        h = hidden.clone().requires_grad_(trainable == "hidden")
        w = weight.clone().requires_grad_(trainable == "weight")
        loss = restricted_cross_entropy(h, w, candidates, targets, backend=backend)
        (grads[backend],) = torch.autograd.grad(loss.sum(), [h if trainable == "hidden" else w])
    return [(f"d{trainable} alone", rel_err(grads["triton"], grads["torch"]), 1e-5)]


def _main_grad(dtype: torch.dtype) -> list[tuple[str, float, float]]:
    hidden, weight, candidates, targets, _ = make_case(13)
    dense = loss_and_grads(restricted_cross_entropy, hidden, weight, candidates, targets, backend="torch")
    # fp32: on top of earlier micro-batches; bf16: from zero, so the error is the rounding of dW alone
    initial = (torch.ones if dtype == torch.float32 else torch.zeros)(weight.shape, dtype=dtype)
    _, _, increment, grad = fused_step(hidden, weight, candidates, targets, initial, backend="triton")
    err = rel_err(increment, dense[2]) if grad is None else float("inf")
    return [(f"dW into {dtype} main_grad", err, 1e-5 if dtype == torch.float32 else 1e-2)]


def _kernel_vs_op() -> list[tuple[str, str, float, float]]:
    results = []
    for n, h, v, c in SHAPES:
        hidden, weight, candidates, targets, teacher = make_case(n + c, n=n, h=h, v=v, c=c)
        for what, err, tol in _compare(restricted_cross_entropy, hidden, weight, candidates, targets):
            results.append((f"ce {n, h, v, c}", what, err, tol))
        for what, err, tol in _compare(restricted_kl_divergence, hidden, weight, candidates, targets, teacher):
            results.append((f"kl {n, h, v, c}", what, err, tol))
    hidden, weight, candidates, targets, _ = make_case(11, dtype=torch.bfloat16)
    results += [("ce bf16", *r) for r in _compare(restricted_cross_entropy, hidden, weight, candidates, targets)]
    for trainable in ("hidden", "weight"):
        results += [("single", *r) for r in _single_gradient(trainable)]
    for dtype in (torch.float32, torch.bfloat16):
        results += [("main_grad", *r) for r in _main_grad(dtype)]
    from replay_megatron_kernels import grid
    grid.MAX_PROGRAMS = 4  # 37 positions on 4 programs: each loops over its share (Ascend caps grids)
    hidden, weight, candidates, targets, _ = make_case(99, n=37, h=24, v=53, c=9)
    results += [("capped grid", *r) for r in _compare(restricted_cross_entropy, hidden, weight, candidates, targets)]
    return results


def test_kernel_equals_pytorch_op_under_interpreter():
    (results,) = run_local(_kernel_vs_op, 1, env={"TRITON_INTERPRET": "1"})
    assert len(results) == 3 * 2 * len(SHAPES) + 3 + 2 + 2 + 3
    bad = [r for r in results if not r[2] < r[3]]
    assert not bad, bad
