"""evaluation.stability against hand-computed values and an independent numpy rolling-window reference."""
import math

import numpy as np
import pytest

from replay_megatron.evaluation.stability import loss_spikes, stability_metrics


def test_std_and_cv_by_hand():
    m = stability_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 3.0])
    assert m["loss_std"] == pytest.approx(math.sqrt(1.25), abs=1e-12)       # population std, mean 2.5
    assert (m["grad_norm_mean"], m["grad_norm_std"], m["grad_norm_cv"]) == pytest.approx((2.0, 1.0, 0.5))
    assert m["steps"] == 4 and m["nonfinite"] == 0 and m["spike_count"] == 0


def test_warmup_is_skipped():
    m = stability_metrics([1.0, 2.0, 3.0, 4.0], [10.0, 1.0, 3.0], skip=1)
    assert m["loss_std"] == pytest.approx(math.sqrt(2 / 3), abs=1e-12)       # of [2, 3, 4]
    assert m["grad_norm_cv"] == pytest.approx(0.5)                           # of [1, 3]
    assert m["steps"] == 3


def test_spike_threshold_by_hand():
    # window [1, 1, 4]: mean 2, std sqrt(2); 5 exceeds 2 + 1*sqrt(2) = 3.41 but not 2 + 3*sqrt(2) = 6.24.
    losses = [1.0, 1.0, 4.0, 5.0]
    assert loss_spikes(losses, window=3, sigma=1.0) == [3]
    assert loss_spikes(losses, window=3, sigma=3.0) == []
    # strictly greater: a constant window (std 0) flags any increase, not an equal loss
    assert loss_spikes([1.0, 1.0, 1.0, 1.0, 1.5], window=3) == [4]
    # no spike before a full window precedes
    assert loss_spikes([1.0, 1.0, 100.0], window=3) == []


def test_spike_indices_refer_to_the_full_series_and_skip_the_warmup_window():
    # skip=0: at index 2 the window is [5, 1] (mean 3, std 2, threshold 9); at 3 it is [1, 1] -> spike
    assert stability_metrics([5.0, 1.0, 1.0, 2.0], [1.0], window=2)["spike_indices"] == [3]
    # skip=1: index 2 has only [1] before it (window not full); index 3 as before, reported as 3
    m = stability_metrics([5.0, 1.0, 1.0, 2.0], [1.0], window=2, skip=1)
    assert m["spike_indices"] == [3] and m["spike_count"] == 1
    # warm-up losses never fill the window: [1, 1, 1, 2] flags 2 with skip=0, nothing with skip=1
    assert stability_metrics([1.0, 1.0, 1.0, 2.0], [1.0], window=3)["spike_indices"] == [3]
    assert stability_metrics([1.0, 1.0, 1.0, 2.0], [1.0], window=3, skip=1)["spike_indices"] == []

def test_nonfinite_values_are_left_out_and_counted():
    m = stability_metrics([1.0, float("nan"), 3.0], [2.0, float("inf"), 2.0])
    assert m["loss_std"] == pytest.approx(1.0) and m["grad_norm_cv"] == pytest.approx(0.0)
    assert m["nonfinite"] == 2 and m["steps"] == 2
    # a NaN never enters the trailing window
    assert loss_spikes([1.0, float("nan"), 1.0, 2.0], window=2) == [3]


def test_empty_after_warmup_gives_none():
    m = stability_metrics([1.0], [1.0], skip=5)
    assert m["loss_std"] is None and m["grad_norm_cv"] is None and m["spike_count"] == 0


def test_matches_numpy_rolling_reference():
    rng = np.random.default_rng(0)
    losses = 2.0 + 0.1 * rng.standard_normal(400)
    losses[[120, 260, 399]] += 1.0                                           # injected spikes
    norms = np.abs(1.0 + 0.3 * rng.standard_normal(400))
    skip, window = 20, 50
    tail = losses[skip:]
    expected = [skip + i for i in range(window, len(tail))
                if tail[i] > tail[i - window:i].mean() + 3.0 * tail[i - window:i].std()]
    m = stability_metrics(losses.tolist(), norms.tolist(), skip=skip)
    assert m["spike_indices"] == expected and {120, 260, 399} <= set(expected)
    assert m["loss_std"] == pytest.approx(float(tail.std()), rel=1e-12)
    assert m["grad_norm_cv"] == pytest.approx(float(norms[skip:].std() / norms[skip:].mean()), rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        loss_spikes([1.0], window=1)
    with pytest.raises(ValueError, match="skip"):
        stability_metrics([1.0], [1.0], skip=-1)
