"""How every run (collect, train, eval) starts: file checks first, then the process group and the output dir.

`preflight` runs on every rank before any process group or model exists, so a bad config or input fails in
seconds on all ranks alike. Rank 0 then creates the output directory and writes the files that describe
the run (`resolved.yaml` and any others the run names) before the others go on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, TypeVar

import torch.distributed as dist

from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.config import model_hf_config, save_resolved
from replay_megatron.platform.distributed import ParallelLayout, initialize

Checked = TypeVar("Checked")


@dataclass
class StartedRun(Generic[Checked]):
    """What a run loop starts from: its preflight's result, the model's HF config and this rank's layout."""

    checked: Checked
    hf: dict[str, Any]
    layout: ParallelLayout


def start_run(cfg, preflight: Callable[[int], Checked], *, world_size: int | None = None,
              output_dir: Path | None = None,
              start_files: Callable[[Checked], Mapping[str, Any]] | None = None) -> StartedRun[Checked]:
    """`preflight(world_size)`, then megatron's process groups; with `output_dir`, rank 0 creates it and
    writes `resolved.yaml` and `start_files(checked)` (name -> JSON) there while the other ranks wait."""
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    checked = preflight(world)
    hf = model_hf_config(cfg)
    layout = initialize(device=cfg.platform.device, tp=cfg.parallel.tensor_model_parallel_size,
                        pp=cfg.parallel.pipeline_model_parallel_size, seed=cfg.run.seed,
                        num_layers=hf["num_hidden_layers"], mindspeed_adaptor=cfg.platform.mindspeed_adaptor)
    if output_dir is not None:
        if layout.rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            for name, content in (start_files(checked) if start_files else {}).items():
                atomic_write_json(output_dir / name, content)
            save_resolved(cfg, output_dir)
        dist.barrier()
    return StartedRun(checked, hf, layout)
