"""Shared helpers of the dynamic Top-K tests: logits with ties and peaks, targets, a float64 reference selection."""
from __future__ import annotations

import numpy as np


def reference_topk(z: np.ndarray, target: int, tau: float, k_max: int):
    """SPEC.md section 1 for one row in float64: (candidate ids, K_t, covered mass, cumulative masses)."""
    z = z.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.lexsort((np.arange(z.size), -p))  # p descending, ties by id ascending
    cumulative = np.cumsum(p[order])
    k_star = int(np.argmax(cumulative >= tau)) + 1 if (cumulative >= tau).any() else z.size
    k = min(k_star, k_max)
    chosen = order[:k].tolist()
    if target not in chosen:
        chosen.append(target)
    return chosen, k, cumulative[k - 1], cumulative


def make_logits(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """Random logits with planted ties: quantised rows (many equal values) mixed with continuous ones, copies
    of the max and of a near-top value planted at random ids, and peaked rows (small K_t) mixed with flat
    ones (K_t hits k_max)."""
    z = rng.standard_normal((n, vocab)) * rng.choice([0.5, 2.0, 6.0, 20.0], size=(n, 1))
    quantised = rng.random(n) < 0.5
    z[quantised] = np.round(z[quantised] * 2) / 2
    rows = np.arange(n)[:, None]
    ranked = np.sort(z, axis=1)[:, ::-1]
    for rank, copies in ((0, 2), (int(rng.integers(1, 10)), 3)):
        z[rows, rng.integers(0, vocab, size=(n, copies))] = ranked[:, rank:rank + 1]
    return z.astype(np.float32)


def make_targets(rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
    """Half the gold ids are the row's argmax (inside the set), half uniform (mostly outside)."""
    targets = rng.integers(0, z.shape[1], size=z.shape[0])
    inside = rng.random(z.shape[0]) < 0.5
    targets[inside] = z[inside].argmax(axis=1)
    return targets
