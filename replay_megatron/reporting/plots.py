"""The report's PNG plots (matplotlib, Agg backend: no display needed): one line per run for loss (raw, faint,
with a smoothed line over it), gradient norm and MoClip's cos(phi) against the step, the K_t (|S_t|)
histogram of each replay store the runs used, and the Pareto view of domain gain against forgetting (one
point per method, error bars = std over its seeds)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from replay_megatron.atomic_io import atomic_write_bytes
from replay_megatron.reporting.runs import RunData


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(data: RunData, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the run's records that have a finite value for it."""
    points = [(r["step"], float(r[key])) for r in data.metrics if r.get(key) is not None]
    points = [(s, v) for s, v in points if np.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def _save(fig, path: Path) -> Path:
    """Write `fig` as a PNG atomically and close it."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def smoothed(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with TensorBoard's bias correction (the first points are not pulled to 0)."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def _line_plot(runs: Sequence[RunData], labels: Sequence[str], key: str, ylabel: str, path: Path,
               smooth: bool = False) -> Path | None:
    """`key` vs step, one line per run that logs it (with `smooth`: faint raw line, smoothed line over it);
    None (no file) when no run does."""
    plotted = [(label, *_series(data, key)) for data, label in zip(runs, labels)]
    plotted = [p for p in plotted if p[1]]
    if not plotted:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, steps, values in plotted:
        if smooth:
            raw, = ax.plot(steps, values, linewidth=0.8, alpha=0.3)
            ax.plot(steps, smoothed(values), color=raw.get_color(), label=f"{label} (smoothed)", linewidth=1.4)
        else:
            ax.plot(steps, values, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def k_values(store_dir: Path) -> np.ndarray:
    """K_t of every stored position of a replay store (per-position candidate counts before gold append)."""
    from replay_megatron.replay.store import ReplayStore

    return ReplayStore.open(store_dir, verify=False).k_values()


def k_histogram(store_dir: Path, label: str, path: Path) -> Path | None:
    """Histogram of K_t over a replay store's positions; None when the store holds no position."""
    k = k_values(store_dir)
    if k.size == 0:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(k, bins=np.arange(k.min(), k.max() + 2) - 0.5 if k.max() - k.min() < 100 else 100,
            edgecolor="white")
    ax.axvline(float(np.median(k)), color="k", linestyle="--", linewidth=1, label=f"median {np.median(k):g}")
    ax.set_xlabel("K_t (candidates per stored position)")
    ax.set_ylabel("positions")
    ax.set_title(label)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(runs: Sequence[RunData], labels: Sequence[str], plots_dir: Path) -> list[Path]:
    """All plots for `runs` into `plots_dir`; returns the files written."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = [_line_plot(runs, labels, "loss", "training loss", plots_dir / "loss.png", smooth=True),
               _line_plot(runs, labels, "grad_norm", "gradient norm |g|", plots_dir / "grad_norm.png"),
               _line_plot(runs, labels, "cos_phi", "MoClip cos(phi)", plots_dir / "cos_phi.png")]
    stores = set()  # runs sharing a store (other optimizers, other seeds) share its histogram
    for index, (data, label) in enumerate(zip(runs, labels)):
        if data.store_dir is not None and data.store_dir.resolve() not in stores:
            stores.add(data.store_dir.resolve())
            written.append(k_histogram(data.store_dir, label, plots_dir / f"k_hist_{index}_{_slug(label)}.png"))
    return [p for p in written if p is not None]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


def pareto_plot(cols: Sequence[dict[str, Any]], base: dict[str, Any] | None, path: Path) -> Path | None:
    """Domain gain (accuracy - the base's, or accuracy without a base) against forgetting (relative
    perplexity change), one point per column with std error bars; None when no column has both."""
    points = [c for c in cols if c["mean"]["domain_accuracy"] is not None and
              c["mean"]["perplexity_change_rel"] is not None]
    if not points:
        return None
    base_accuracy = (base or {}).get("domain_accuracy")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in points:
        mean, std = c["mean"], c["std"]
        y = mean["domain_accuracy"] - (base_accuracy or 0.0)
        ax.errorbar(100 * mean["perplexity_change_rel"], y, fmt="o", capsize=3,
                    xerr=None if std["perplexity_change_rel"] is None else 100 * std["perplexity_change_rel"],
                    yerr=std["domain_accuracy"], label=f"{c['label']} (n={len(c['run_dirs'])})")
    ax.set_xlabel("forgetting: general perplexity change (%)")
    ax.set_ylabel("domain accuracy gain over the base" if base_accuracy is not None else "domain accuracy")
    ax.set_title("domain gain vs forgetting (upper left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
