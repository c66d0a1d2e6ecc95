"""The layout of a run directory `<run.out_dir>/<run.name>`: what `train` writes and `eval`/`report` read.

    resolved.yaml                  the resolved config (config.save_resolved), fingerprint in the header
    metrics.jsonl                  one JSON object per logged step (keys: METRIC_KEYS, plus optional ones)
    eval_metrics.jsonl             held-out perplexity during training: {"step", "eval_loss", "perplexity"}
    summary.json                   end of training: steps, timing, stability metrics (SPEC.md section 5)
    eval.json                      `eval`'s results: perplexity, its change vs the base, relative L2, domain
    checkpoints/iter_NNNNNNN/      the state after optimizer step N:
        model/                     weights (models.checkpoint.save_megatron: loads at any TP/PP, and is a
                                   valid model.mcore_checkpoint for another run)
        optimizer/                 optimizer state (megatron dist checkpoint, this run's TP/PP only)
        train_state.json           step, consumed samples, counters
        checksums.json             bytes and sha256 of every file above (written last: marks it complete;
                                   a resume verifies it, training.checkpoint_manifest)
    checkpoints/iter_0000000/model the starting weights, saved only when they are a preset's random init
                                   (the base of `eval`'s relative L2 distance)
    checkpoints/latest             text file: the name of the newest complete checkpoint dir
    hf/                            HF export of the final weights (train.export_hf)
    tensorboard/                   TensorBoard events (logging.tensorboard and tensorboard installed)
    plots/                         `report`'s PNGs (when the report is written into the run dir)

    .writer.lock                   held by rank 0 of the running `train` (replay_megatron.writer_lock)

Every file is written atomically by rank 0 (checkpoints: by all ranks through dist_checkpointing, then
`checksums.json`, then `latest`), so a reader never sees half a file and a killed run resumes from `latest`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

RESOLVED = "resolved.yaml"
METRICS = "metrics.jsonl"
EVAL_METRICS = "eval_metrics.jsonl"
SUMMARY = "summary.json"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
HF_EXPORT = "hf"
TENSORBOARD = "tensorboard"
TRAIN_STATE = "train_state.json"
CHECKSUMS = "checksums.json"
_CHECKPOINT_NAME = re.compile(r"iter_\d{7}")

# Keys every metrics.jsonl line has. MoClip runs add cos_phi, clipped, clip_rate, grad_norm_clipped
# (|g'|); replay runs add k_mean, k_median, k_max (|S_t| over the step's stored positions).
# tokens_per_s counts real (non-pad) positions; padding_fraction is the rest of the batch's positions.
METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "tokens", "tokens_per_s", "padding_fraction",
               "step_time_s", "peak_memory_bytes", "consumed_samples")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step `step`."""
    return f"iter_{step:07d}"


def saved_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The `iter_*` dirs of `run_dir` holding a train state (saved after a step, maybe damaged), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("iter_*") if _CHECKPOINT_NAME.fullmatch(p.name) and (p / TRAIN_STATE).is_file()]
    return sorted(found)


def latest_pointer(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint dir `checkpoints/latest` names (None when there is no such file); raises ValueError naming
    the file when it is not a readable pointer to an `iter_*` name."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not os.path.lexists(pointer):
        return None
    try:
        name = pointer.read_text(encoding="ascii").strip()
    except (OSError, ValueError) as e:
        raise ValueError(f"{pointer} is unreadable ({e})") from None
    if not _CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(f"{pointer} holds {name[:40]!r}, not the name of an iter_NNNNNNN checkpoint dir")
    return pointer.parent / name


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of `run_dir` (from `checkpoints/latest`), or None for a fresh run; raises
    naming the file when `latest` is unreadable or missing while checkpoints are there."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    path = latest_pointer(run_dir)
    if path is None:
        saved = saved_checkpoints(run_dir)
        if saved:
            raise FileNotFoundError(f"{pointer} is missing, but {pointer.parent} holds {saved[-1].name}: write its "
                                    f"name into {pointer} (or resume the run with `train`, which verifies it)")
        return None
    if not (path / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {TRAIN_STATE}: the checkpoint "
                                f"is incomplete; point {pointer} at an earlier iter_* dir or remove it")
    return path


def checkpoint_model_dir(run_dir: str | os.PathLike) -> Path:
    """The final (newest) weights of a run: `<latest checkpoint>/model`; names the run dir when none."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{Path(run_dir) / CHECKPOINTS / LATEST}: no checkpoint (has `train` run "
                                f"in {run_dir}?)")
    return latest / "model"


def read_jsonl(path: str | os.PathLike, *, torn_tail_ok: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file (metrics.jsonl), naming the file and line of a malformed one.

    `torn_tail_ok`: a malformed *last* line (what a kill during its append leaves) is skipped with a message.
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # a bad byte fails as not JSON, by line
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    for number, line in lines:
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail_ok and number == lines[-1][0]:
                print(f"{path}:{number}: dropping a torn last line (a run killed while writing it)", flush=True)
                return
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
