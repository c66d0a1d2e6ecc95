"""Position strategies of SPEC.md section 1: determinism per (seed, sample id), amounts, bucket coverage."""
from __future__ import annotations

import numpy as np
import pytest

from replay_megatron.replay.positions import bucket_quotas, resolve_count, select_positions


def sample(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Loss-bearing positions (a response span starting at 10) with confidences that tie in places."""
    positions = np.arange(10, 10 + length)
    return positions, np.round(rng.random(length), 1)


@pytest.mark.parametrize("strategy", ["random", "bucket"])
def test_same_choice_whatever_the_order_and_grouping(strategy: str) -> None:
    """A sample's choice depends on (seed, sample id) only: not on which samples come before it, how they are
    grouped into micro-batches or DP ranks, nor the order its positions are listed in."""
    rng = np.random.default_rng(0)
    data = {sid: sample(rng, int(rng.integers(1, 80))) for sid in range(40)}

    def choose(sid: int, permute: np.ndarray | None = None) -> list[int]:
        pos, conf = data[sid]
        if permute is not None:
            pos, conf = pos[permute], conf[permute]
        return select_positions(strategy, pos, sample_id=sid, seed=123, amount=0.3, confidences=conf).tolist()

    in_order = {sid: choose(sid) for sid in data}
    dp_rank1_reversed = {sid: choose(sid) for sid in reversed(range(1, 40, 2))}
    shuffled_positions = {sid: choose(sid, rng.permutation(len(data[sid][0]))) for sid in data}
    assert all(in_order[s] == dp_rank1_reversed[s] for s in dp_rank1_reversed)
    assert in_order == shuffled_positions
    other_seed = [select_positions(strategy, data[s][0], sample_id=s, seed=124, amount=0.3,
                                   confidences=data[s][1]).tolist() for s in data]
    assert sum(a != in_order[s] for s, a in zip(data, other_seed)) > 20  # the seed matters


def test_pinned_outputs() -> None:
    """The draws come from raw PCG64 outputs, fixed by algorithm; a change here breaks resuming old stores."""
    pos = np.arange(10, 30)
    assert select_positions("random", pos, sample_id=7, seed=1234, amount=5).tolist() == [11, 18, 19, 20, 23]
    assert select_positions("bucket", pos, sample_id=7, seed=1234, amount=7,
                            confidences=np.linspace(0, 1, 20)).tolist() == [10, 11, 15, 17, 18, 23, 27]


def test_amounts_and_simple_strategies() -> None:
    assert resolve_count(0.5, 11) == 6 and resolve_count(0.01, 3) == 1 and resolve_count(1.0, 7) == 7
    assert resolve_count(4, 11) == 4 and resolve_count(40, 11) == 11 and resolve_count(0.5, 0) == 0
    pos = np.array([30, 12, 17, 25, 40])
    assert select_positions("all", pos, sample_id=0, seed=0, amount=1).tolist() == [12, 17, 25, 30, 40]
    assert select_positions("last", pos, sample_id=0, seed=0, amount=2).tolist() == [30, 40]
    assert select_positions("last", pos, sample_id=0, seed=0, amount=0.5).tolist() == [25, 30, 40]
    for strategy in ("random", "last", "bucket"):
        got = select_positions(strategy, pos, sample_id=3, seed=0, amount=9, confidences=np.ones(5))
        assert got.tolist() == [12, 17, 25, 30, 40]  # n >= available: everything
        empty = select_positions(strategy, [], sample_id=3, seed=0, confidences=[])
        assert empty.dtype == np.int64 and empty.size == 0


def test_random_is_uniform() -> None:
    """Each of 20 positions is chosen with probability n/L = 1/4 over 4000 sample ids (3 sigma ~ 0.02)."""
    counts = np.zeros(20)
    for sid in range(4000):
        counts[select_positions("random", np.arange(20), sample_id=sid, seed=5, amount=5)] += 1
    np.testing.assert_allclose(counts / 4000, 0.25, atol=0.025)


def test_bucket_takes_its_quota_from_each_confidence_bucket() -> None:
    rng = np.random.default_rng(1)
    for length, n, buckets in [(103, 23, 5), (50, 7, 5), (12, 2, 5), (3, 2, 5), (40, 13, 1), (61, 60, 4)]:
        pos = rng.permutation(1000)[:length]
        conf = rng.random(length)
        got = select_positions("bucket", pos, sample_id=length, seed=9, amount=n, confidences=conf,
                               buckets=buckets)
        assert len(got) == n and np.all(np.diff(got) > 0) and set(got) <= set(pos)
        ranked = pos[np.argsort(conf)]
        sizes, quotas = bucket_quotas(length, n, buckets)
        bucket_of = dict(zip(ranked, np.repeat(np.arange(buckets), sizes)))
        taken = np.bincount([bucket_of[p] for p in got], minlength=buckets)
        assert taken.tolist() == quotas.tolist(), (length, n, buckets)
    # n < B: the leftovers go to the lowest-confidence buckets first
    assert bucket_quotas(12, 2, 5)[1].tolist() == [1, 1, 0, 0, 0]


def test_bucket_ties_split_by_position() -> None:
    """All confidences equal: buckets are runs of consecutive positions, one pick from each."""
    got = select_positions("bucket", np.arange(100), sample_id=1, seed=1, amount=5, confidences=np.full(100, 0.5))
    assert (got // 20).tolist() == [0, 1, 2, 3, 4]


def test_bucket_quotas_never_exceed_bucket_sizes() -> None:
    """The documented reason there is no shortfall to redistribute, over a full grid."""
    for buckets in range(1, 9):
        for available in range(0, 60):
            for n in range(0, available + 1):
                sizes, quotas = bucket_quotas(available, n, buckets)
                assert sizes.sum() == available and quotas.sum() == n
                assert np.all(quotas <= sizes), (available, n, buckets)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown position strategy 'first'"):
        select_positions("first", [1, 2], sample_id=0, seed=0)
    with pytest.raises(ValueError, match="needs the gold confidences"):
        select_positions("bucket", [1, 2, 3], sample_id=0, seed=0, amount=1)
    with pytest.raises(ValueError, match="sample 4: 2 confidences for 3 positions"):
        select_positions("bucket", [1, 2, 3], sample_id=4, seed=0, amount=1, confidences=[0.1, 0.2])
    with pytest.raises(ValueError, match="must be distinct"):
        select_positions("random", [1, 2, 2], sample_id=0, seed=0, amount=1)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        resolve_count(1.5, 10)
    with pytest.raises(ValueError, match="count must be >= 1"):
        resolve_count(0, 10)
    with pytest.raises(TypeError):
        resolve_count(True, 10)
    with pytest.raises(ValueError, match="sample_id must be >= 0"):
        select_positions("random", [1, 2, 3], sample_id=-1, seed=0, amount=1)
