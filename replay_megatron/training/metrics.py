"""Per-step metrics of a training run: `metrics.jsonl` (+ TensorBoard when installed), written by rank 0.

A resumed run first drops the lines past the checkpoint it resumes from (a killed run may have logged
steps it did not save), so the file always reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from replay_megatron.atomic_io import atomic_write_text
from replay_megatron import run_dir as layout_of_run


def _json_value(value: Any) -> Any:
    """NaN/Inf as null (JSON has no NaN; a skipped step's loss is not a number)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Appends one JSON line per logged step; mirrors scalars to TensorBoard if asked and available.

    Owns the log cadence (`should_log`: every `log_interval` steps and the run's last). Only the writing
    rank (`active`, rank 0) touches files; elsewhere every call is a no-op, so the loop reads the same on
    every rank.
    """

    def __init__(self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True,
                 resume_step: int = 0, log_interval: int = 1, total_steps: int | None = None,
                 active: bool = True) -> None:
        self.path = Path(run_dir) / layout_of_run.METRICS
        self.eval_path = Path(run_dir) / layout_of_run.EVAL_METRICS
        self.jsonl = jsonl and active
        self.log_interval, self.total_steps = log_interval, total_steps
        if self.jsonl:
            for path in (self.path, self.eval_path):
                truncate_after(path, resume_step)
        self._tb = _summary_writer(Path(run_dir) / layout_of_run.TENSORBOARD) if tensorboard and active else None

    def should_log(self, step: int) -> bool:
        return step % self.log_interval == 0 or step == self.total_steps

    def log(self, record: Mapping[str, Any], *, eval_record: bool = False) -> None:
        """Write one record (a dict with "step"); non-finite floats become null in the JSON."""
        if self.jsonl:
            with open(self.eval_path if eval_record else self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            prefix = "eval/" if eval_record else "train/"
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records of `path` with record["step"] <= step (atomic rewrite; no file: nothing)."""
    if not path.is_file():
        return
    kept = [r for r in layout_of_run.read_jsonl(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _summary_writer(directory: Path):
    """A TensorBoard SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(directory))
