"""Training-stability metrics of SPEC.md section 5, as pure functions of the logged per-step series.

    loss std      population std of the loss after warm-up
    grad-norm CV  std / mean of the gradient norm after warm-up (population std)
    spikes        steps whose loss exceeds the mean of the `window` preceding post-warm-up losses by
                  more than `sigma` of their (population) std; counted only once a full window precedes

Non-finite values (a NaN loss, an inf gradient norm of a skipped step) are left out of every statistic
and the window, and counted in `nonfinite`, so one overflow does not turn every metric into NaN.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def loss_spikes(losses: Sequence[float], *, window: int = 50, sigma: float = 3.0) -> list[int]:
    """Indices into `losses` of spikes: loss > mean + sigma * std of the `window` preceding finite losses."""
    if window < 2:
        raise ValueError(f"window must be >= 2 (a std needs two values), got {window}")
    trailing: deque[float] = deque(maxlen=window)
    spikes = []
    for index, loss in enumerate(losses):
        if not math.isfinite(loss):
            continue
        if len(trailing) == window:
            mean, std = _mean_std(trailing)
            if loss > mean + sigma * std:
                spikes.append(index)
        trailing.append(loss)
    return spikes


def configured_stability(losses: Sequence[float], grad_norms: Sequence[float], cfg) -> dict:
    """`stability_metrics` with a run config's settings: its spike window and sigma, and its warm-up
    (`logging.stability_skip_iters`, default `optimizer.warmup_iters`) left out."""
    log = cfg.logging
    skip = cfg.optimizer.warmup_iters if log.stability_skip_iters is None else log.stability_skip_iters
    return stability_metrics(losses, grad_norms, window=log.spike_window, sigma=log.spike_sigma, skip=skip)


def stability_metrics(losses: Sequence[float], grad_norms: Sequence[float], *, window: int = 50,
                      sigma: float = 3.0, skip: int = 0) -> dict:
    """SPEC.md section 5 stability metrics of one run's per-step `losses` and `grad_norms`.

    The first `skip` entries of each series (the warm-up) are left out. Returns loss_std, grad_norm_mean,
    grad_norm_std, grad_norm_cv (None where the series has no finite value after warm-up), spike_count,
    spike_indices (indices into the full `losses`), steps (finite losses measured) and nonfinite (count of
    non-finite losses and grad norms after warm-up).
    """
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    tail_losses = [float(v) for v in losses[skip:]]
    tail_norms = [float(v) for v in grad_norms[skip:]]
    finite_losses = [v for v in tail_losses if math.isfinite(v)]
    finite_norms = [v for v in tail_norms if math.isfinite(v)]
    spikes = [skip + i for i in loss_spikes(tail_losses, window=window, sigma=sigma)]

    loss_std = _mean_std(finite_losses)[1] if finite_losses else None
    norm_mean = norm_std = norm_cv = None
    if finite_norms:
        norm_mean, norm_std = _mean_std(finite_norms)
        norm_cv = norm_std / norm_mean if norm_mean > 0 else None
    return {
        "loss_std": loss_std,
        "grad_norm_mean": norm_mean,
        "grad_norm_std": norm_std,
        "grad_norm_cv": norm_cv,
        "spike_count": len(spikes),
        "spike_indices": spikes,
        "steps": len(finite_losses),
        "nonfinite": (len(tail_losses) - len(finite_losses)) + (len(tail_norms) - len(finite_norms)),
        "window": window,
        "sigma": sigma,
        "skip": skip,
    }

