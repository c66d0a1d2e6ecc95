"""Export a run's final weights as a Hugging Face Qwen3 directory `<run_dir>/hf` (train.export_hf)."""
from __future__ import annotations

import shutil
from pathlib import Path


def export_run_to_hf(run_dir: str | Path, device: str = "cpu") -> Path:
    """Reshard the latest checkpoint's weights to one process and write `<run_dir>/hf` (replaced whole).

    Runs in a fresh spawned process: the training job's process group (TP x PP ranks) is gone by then,
    and the export needs a 1-rank megatron state of its own. Written to `hf.tmp`, then renamed.
    """
    from replay_megatron.models.checkpoint import megatron_to_hf
    from replay_megatron.platform.spawn import run_local
    from replay_megatron import run_dir as layout_of_run

    run_dir = Path(run_dir)
    target = run_dir / layout_of_run.HF_EXPORT
    tmp = run_dir / (layout_of_run.HF_EXPORT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run_local(megatron_to_hf, 1, str(layout_of_run.checkpoint_model_dir(run_dir)), str(tmp), device)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
