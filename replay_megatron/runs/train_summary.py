"""`summary.json` of a training run: its length, efficiency and stability metrics (SPEC.md section 5)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from replay_megatron import run_dir as layout_of_run
from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.evaluation.stability import configured_stability
from replay_megatron.training.checkpointing import TrainState


def write_summary(cfg, run_dir: Path, state: TrainState, status: str, planned: int) -> dict[str, Any]:
    """Summarise `metrics.jsonl` (skipped steps count toward length, not toward loss or stability)."""
    records = list(layout_of_run.read_jsonl(run_dir / layout_of_run.METRICS)) if cfg.logging.jsonl else []
    ok = [r for r in records if not r["skipped"]]
    summary = {
        "status": status, "steps": state.step, "planned_steps": planned, "skipped_steps": state.skipped_steps,
        "consumed_samples": state.consumed_samples, "loss": cfg.train.loss, "optimizer": cfg.optimizer.name,
        "final_loss": ok[-1]["loss"] if ok else None,
        "median_step_time_s": statistics.median(r["step_time_s"] for r in records) if records else None,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records) if records else None,
        "peak_memory_bytes": max((r["peak_memory_bytes"] for r in records), default=None),
        "stability": configured_stability([r["loss"] for r in ok], [r["grad_norm"] for r in ok], cfg),
    }
    if ok and "clip_rate" in ok[-1]:
        summary["moclip_clip_rate"] = ok[-1]["clip_rate"]
    if ok and "k_mean" in ok[-1]:
        summary["k_mean"] = statistics.fmean(r["k_mean"] for r in ok)
    atomic_write_json(run_dir / layout_of_run.SUMMARY, summary)
    return summary
