"""One run directory read into the numbers a report shows (SPEC.md section 5), from the files `train`,
`eval` and `collect` leave (`run_dir`): metrics.jsonl is required; resolved.yaml, summary.json,
eval.json and the replay store are optional, and what they would give is None when they are absent.

Stability metrics come from summary.json when `train` wrote it, else from metrics.jsonl with the run's
logging settings; efficiency figures (median step time, median tokens/s, peak memory) always from
metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replay_megatron.evaluation.stability import configured_stability, stability_metrics
from replay_megatron import run_dir as layout_of_run


@dataclass
class RunData:
    """The raw material of one run: its per-step records and whatever optional files exist."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    config: Any = None  # ReplayConfig from resolved.yaml, or None
    summary: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    store_dir: Path | None = None  # the replay store of a replay run, when it exists
    notes: list[str] = field(default_factory=list)  # why an optional file was not used


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read `run_dir`; raises FileNotFoundError naming metrics.jsonl when the run has none."""
    from replay_megatron.config import ConfigError, load_resolved

    run_dir = Path(run_dir)
    metrics_path = run_dir / layout_of_run.METRICS
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no metrics (is {run_dir} a run directory `train` wrote?)")
    data = RunData(run_dir, list(layout_of_run.read_jsonl(metrics_path)),
                   summary=_read_json(run_dir / layout_of_run.SUMMARY),
                   eval=_read_json(run_dir / layout_of_run.EVAL))
    if (run_dir / layout_of_run.RESOLVED).is_file():
        try:
            data.config = load_resolved(run_dir)
        except ConfigError as e:
            data.notes.append(str(e))
    if data.config is not None and data.config.train.loss == "replay" and data.config.train.replay_store:
        store = data.config.input_path(data.config.train.replay_store)
        if (store / "manifest.json").is_file():
            data.store_dir = store
        else:
            data.notes.append(f"replay store {store} not found (relative to the working dir the report runs in)")
    return data


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _median(records: list[dict], key: str) -> float | None:
    values = _finite(r.get(key) for r in records)
    return statistics.median(values) if values else None


def _stability(data: RunData) -> dict[str, Any]:
    if data.summary is not None and "stability" in data.summary:
        return data.summary["stability"]
    ok = [r for r in data.metrics if not r.get("skipped")]
    losses = [math.nan if r.get("loss") is None else r["loss"] for r in ok]
    norms = [math.nan if r.get("grad_norm") is None else r["grad_norm"] for r in ok]
    if data.config is not None:
        return configured_stability(losses, norms, data.config)
    return stability_metrics(losses, norms)


def method_name(data: RunData) -> str | None:
    """"<loss> + <optimizer>" (e.g. "replay + moclip") from resolved.yaml or summary.json."""
    if data.config is not None:
        return f"{data.config.train.loss} + {data.config.optimizer.name}"
    if data.summary is not None and "loss" in data.summary and "optimizer" in data.summary:
        return f"{data.summary['loss']} + {data.summary['optimizer']}"
    return None


def store_figures(store_dir: Path) -> dict[str, Any]:
    """Stage 0 figures of a replay store: bytes per position, fraction of fp16 logits, K_t stats, wall time
    (of the collect invocation that finished the store) when collect recorded it."""
    from replay_megatron.replay.records import TIMING_RECORD
    from replay_megatron.replay.store import ReplayStore

    s = ReplayStore.open(store_dir, verify=False).summary()
    timing = _read_json(store_dir / TIMING_RECORD) or {}
    return {"stage0_time_s": timing.get("wall_s"),
            "stage0_s_per_micro_batch": timing.get("seconds_per_micro_batch"),
            "storage_bytes_per_position": s["bytes_per_position"],
            "storage_fraction_of_fp16_logits": s["fraction_of_fp16_logits"], "k_median": s["k_median"],
            "k_mean": s["k_mean"]}


def repeat_key(data: RunData) -> str:
    """Runs with equal keys are repeats of one run that differ only in `run.seed` (and where they were
    written, `run.out_dir`); a run without resolved.yaml is a repeat of none."""
    if data.config is None:
        return f"dir:{data.run_dir.resolve()}"
    config = data.config.model_dump(mode="json")
    config["run"] = {k: v for k, v in config["run"].items() if k not in ("seed", "out_dir")}
    return json.dumps(config, sort_keys=True)


def run_row(data: RunData) -> dict[str, Any]:
    """The report's numbers for one run (None = not available)."""
    ok = [r for r in data.metrics if not r.get("skipped")]
    stability = _stability(data)
    final_loss = data.summary.get("final_loss") if data.summary else None
    if final_loss is None and ok:
        final_loss = ok[-1].get("loss")
    ev = data.eval or {}
    domain = ev.get("domain") or {}
    peaks = _finite(r.get("peak_memory_bytes") for r in data.metrics)
    row = {
        "run_dir": str(data.run_dir), "name": data.config.run.name if data.config else data.run_dir.name,
        "method": method_name(data), "seed": data.config.run.seed if data.config else None,
        "steps": (data.summary or {}).get("steps") or (data.metrics[-1]["step"] if data.metrics else None),
        "final_loss": final_loss,
        "loss_std": stability.get("loss_std"), "grad_norm_cv": stability.get("grad_norm_cv"),
        "spike_count": stability.get("spike_count"),
        "median_step_time_s": _median(data.metrics, "step_time_s"),
        "tokens_per_s": _median(data.metrics, "tokens_per_s"),
        "peak_memory_bytes": int(max(peaks)) if peaks else None,
        "perplexity": (ev.get("finetuned") or {}).get("perplexity"),
        "base_perplexity": (ev.get("base") or {}).get("perplexity"),
        "perplexity_change": ev.get("perplexity_change"), "perplexity_change_rel": ev.get("perplexity_change_rel"),
        "relative_l2": ev.get("relative_l2"), "domain_accuracy": domain.get("accuracy"),
        "stage0_time_s": None, "stage0_s_per_micro_batch": None, "storage_bytes_per_position": None,
        "storage_fraction_of_fp16_logits": None, "k_median": None, "k_mean": None,
    }
    if data.store_dir is not None:
        row.update(store_figures(data.store_dir))
    return row
