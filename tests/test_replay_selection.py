"""dynamic_topk equals a float64 NumPy brute force of SPEC.md section 1 (single process, whole vocabulary)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replay_megatron.replay.selection import dynamic_topk, gold_probability
from topk_fixtures import make_logits, make_targets, reference_topk

# fp32 vs float64 cumulative mass may put K_t on either side of tau when they are this close.
BOUNDARY_EPS = 1e-6








def check_against_reference(z: np.ndarray, targets: np.ndarray, out, tau: float, k_max: int) -> dict:
    """Assert row-by-row equality with the reference; returns counts of excluded/appended/inside rows."""
    counts = {"rows": len(z), "excluded": 0, "appended": 0, "inside": 0}
    for i in range(len(z)):
        ids, k, mass, cumulative = reference_topk(z[i], int(targets[i]), tau, k_max)
        if np.any(np.abs(cumulative[:k_max] - tau) < BOUNDARY_EPS):
            counts["excluded"] += 1
            continue
        got = out.candidates[i].tolist()
        assert got == ids + [-1] * (k_max + 1 - len(ids)), f"row {i}"
        assert int(out.k[i]) == k, f"row {i}"
        assert abs(float(out.covered_mass[i]) - mass) < 1e-6, f"row {i}"
        counts["appended" if len(ids) > k else "inside"] += 1
    return counts


@pytest.mark.parametrize("k_max", [1, 5, 200])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
def test_matches_float64_reference(tau: float, k_max: int) -> None:
    rng = np.random.default_rng(1000 * k_max + int(tau * 100))
    z = make_logits(rng, 96, 1000)
    targets = make_targets(rng, z)
    out = dynamic_topk(torch.from_numpy(z), torch.from_numpy(targets), tau, k_max)
    assert out.candidates.shape == (96, k_max + 1) and out.candidates.dtype == torch.int64
    assert out.candidate_logits is None and out.lse is None
    if k_max > 1:  # the grid reaches both K_t < k_max (tau binds) and K_t = k_max (the cap binds)
        assert (out.k < k_max).any() and (out.k == k_max).any()
    counts = check_against_reference(z, targets, out, tau, k_max)
    assert counts["excluded"] <= 2, counts  # boundary exclusions must stay rare
    assert counts["appended"] > 0 and counts["inside"] > 0, counts


def test_bf16_ties_and_logits_outputs() -> None:
    """bf16 logits tie constantly; the deterministic tie rule and the optional outputs must still hold."""
    rng = np.random.default_rng(7)
    z = torch.from_numpy(make_logits(rng, 64, 512)).bfloat16()
    z_np = z.float().numpy()
    targets = make_targets(rng, z_np)
    out = dynamic_topk(z, torch.from_numpy(targets), 0.9, 50, return_logits=True)
    counts = check_against_reference(z_np, targets, out, 0.9, 50)
    assert counts["excluded"] <= 2, counts
    lse64 = np.log(np.exp(z_np.astype(np.float64) - z_np.max(1, keepdims=True)).sum(1)) + z_np.max(1)
    np.testing.assert_allclose(out.lse.numpy(), lse64, rtol=1e-6, atol=1e-5)
    valid = out.candidates >= 0
    expected = torch.full_like(out.candidate_logits, float("-inf"))
    expected[valid] = z.float().gather(1, out.candidates.clamp(min=0))[valid]
    assert torch.equal(out.candidate_logits, expected)
    conf = gold_probability(z, torch.from_numpy(targets))
    ref = np.exp(z_np[np.arange(64), targets].astype(np.float64) - lse64)
    np.testing.assert_allclose(conf.numpy(), ref, rtol=1e-5, atol=1e-7)


def test_all_equal_logits_take_lowest_ids() -> None:
    z = torch.zeros(3, 40)
    out = dynamic_topk(z, torch.tensor([0, 39, 2]), 0.11, 10)  # 0.11 / 0.025 per token -> K_t = 5
    assert out.k.tolist() == [5, 5, 5]
    assert out.candidates[0].tolist() == [0, 1, 2, 3, 4] + [-1] * 6
    assert out.candidates[1].tolist() == [0, 1, 2, 3, 4, 39] + [-1] * 5
    assert out.candidates[2].tolist() == [0, 1, 2, 3, 4] + [-1] * 6


def test_k_max_above_vocab_and_tau_one() -> None:
    z = torch.tensor([[3.0, 1.0, 2.0]])
    out = dynamic_topk(z, torch.tensor([1]), 1.0, 8)
    assert out.k.tolist() == [3] and out.candidates[0].tolist() == [0, 2, 1] + [-1] * 6
    assert abs(float(out.covered_mass[0]) - 1.0) < 1e-6


def test_bad_input_is_named() -> None:
    z = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="targets must be global token ids"):
        dynamic_topk(z, torch.tensor([0, 10]), 0.9, 3)
    with pytest.raises(ValueError, match="tau"):
        dynamic_topk(z, torch.tensor([0, 1]), 0.0, 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        dynamic_topk(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 1]), 0.9, 1)
