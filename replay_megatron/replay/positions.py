"""Which loss-bearing positions of a sample Stage 0 stores (SPEC.md section 1, "Position selection").

Strategies `all | random | last | bucket`. Randomness comes from a generator keyed by (global seed, sample
id) alone, so a sample gets the same positions whatever the DP size, micro-batch size or processing order.
Subsets are drawn from the raw 64-bit outputs of PCG64 (stable by algorithm) rather than from
`Generator.choice`, whose stream numpy does not promise to keep across versions; a store resumed under
another numpy version therefore still matches.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np

Strategy = Literal["all", "random", "last", "bucket"]
STRATEGIES: tuple[str, ...] = ("all", "random", "last", "bucket")
# Our choice, not the paper's (it does not state n): half of each sample's loss-bearing positions.
DEFAULT_AMOUNT = 0.5
DEFAULT_BUCKETS = 5  # the paper's B


def resolve_count(amount: int | float, available: int) -> int:
    """n for a sample with `available` loss-bearing positions: a float in (0, 1] is a fraction (rounded up,
    so a non-empty sample keeps at least one position), an int >= 1 is a count; capped at `available`."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"amount must be a fraction (float) or a count (int), got {amount!r}")
    if isinstance(amount, float):
        if not 0.0 < amount <= 1.0:
            raise ValueError(f"amount as a fraction must be in (0, 1], got {amount}")
        return min(available, math.ceil(amount * available))
    if amount < 1:
        raise ValueError(f"amount as a count must be >= 1, got {amount}")
    return min(available, amount)


def sample_generator(seed: int, sample_id: int) -> np.random.PCG64:
    """The bit generator of one sample, keyed by (global seed, sample id) only."""
    if seed < 0 or sample_id < 0:
        raise ValueError(f"seed and sample_id must be >= 0, got seed={seed}, sample_id={sample_id}")
    return np.random.PCG64(np.random.SeedSequence([seed, sample_id]))


def _uniform_subset(bits: np.random.PCG64, size: int, n: int) -> np.ndarray:
    """Indices of a uniform random n-subset of range(size): the n smallest of `size` random 64-bit keys."""
    keys = bits.random_raw(size)
    return np.argsort(keys, kind="stable")[:n]


def bucket_quotas(available: int, n: int, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Sizes of the B equal-count buckets and the number drawn from each (SPEC.md section 1, `bucket`).

    Bucket sizes differ by at most one, larger ones first (lowest confidence); each bucket gets n // B and
    the n % B leftovers go one each to the lowest-confidence buckets. For n <= available this never asks a
    bucket for more than it holds (if n//B == available//B then n%B <= available%B), so nothing needs to be
    redistributed.
    """
    sizes = np.full(buckets, available // buckets) + (np.arange(buckets) < available % buckets)
    quotas = np.full(buckets, n // buckets) + (np.arange(buckets) < n % buckets)
    return sizes, quotas


def select_positions(strategy: Strategy, positions, *, sample_id: int, seed: int,
                     amount: int | float = DEFAULT_AMOUNT, confidences=None,
                     buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """The sorted positions (int64) of one sample that Stage 0 stores.

    `positions`: the sample's loss-bearing positions (any order, distinct). `confidences`: c_t = p_t(x_t) at
    those positions, same order (needed by `bucket` only; see selection.gold_probability). `amount`: see
    `resolve_count`; `all` ignores it. `bucket` orders positions by (confidence, position), splits them
    into `buckets` equal-count buckets (ties thus split by position) and draws each bucket's quota
    uniformly, buckets in order of rising confidence, from the sample's one generator. When n covers every
    position, every strategy returns them all.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown position strategy {strategy!r}; expected one of {STRATEGIES}")
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    if positions.size > 1 and np.any(positions[1:] == positions[:-1]):
        raise ValueError(f"sample {sample_id}: loss-bearing positions must be distinct")
    n = positions.size if strategy == "all" else resolve_count(amount, positions.size)
    if n == positions.size:
        return positions
    if strategy == "last":
        return positions[positions.size - n:]
    bits = sample_generator(seed, sample_id)
    if strategy == "random":
        return np.sort(positions[_uniform_subset(bits, positions.size, n)])
    if confidences is None:
        raise ValueError("strategy 'bucket' needs the gold confidences c_t of the positions")
    confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
    if confidences.shape != positions.shape:
        raise ValueError(f"sample {sample_id}: {confidences.size} confidences for {positions.size} positions")
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    ranked = positions[np.lexsort((positions, confidences[order]))]  # rising confidence, ties by position
    sizes, quotas = bucket_quotas(positions.size, n, buckets)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chosen = [ranked[starts[b]:starts[b + 1]][_uniform_subset(bits, sizes[b], quotas[b])] for b in range(buckets)]
    return np.sort(np.concatenate(chosen))
