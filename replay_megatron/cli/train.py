"""`replay-megatron train --config FILE [key=value ...]`: Stage 1 replay training or full-vocabulary SFT.

Launch it like any megatron job (one process per device):

    NPROC=2 launch/cpu_gloo.sh train configs/cpu/tiny_tp2pp1.yaml run.data_root=/tmp/tiny     # CPU, gloo
    launch/torchrun_910b.sh train configs/paper/qwen3_8b/replay_moclip.yaml                 # 910B nodes

Without torchrun (no WORLD_SIZE) it runs as one process. Re-running the same command resumes from the
run dir's latest checkpoint; SIGTERM saves a checkpoint and exits 0. At the end it exports the weights to
`<run_dir>/hf` (train.export_hf). Exit codes: 0 done or checkpointed, 2 refused input, 3 aborted after
too many non-finite steps.
"""
from __future__ import annotations

import argparse
import sys

from replay_megatron.cli._config_args import add_config_arguments, run_config_job

HELP = "Stage 1 replay training or full-vocabulary SFT (resumable; metrics, checkpoints, HF export)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `train`."""
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or step lines on rank 0")


def run(args: argparse.Namespace) -> int:
    """Load the config, train, export to HF on rank 0, print the summary."""
    from replay_megatron.training.faults import TrainingAborted
    from replay_megatron.runs.train import train

    progress = False if args.no_progress else None
    try:
        cfg, summary = run_config_job(args, "train",
                                      lambda cfg, world: train(cfg, world_size=world, progress=progress))
    except TrainingAborted as e:
        print(f"replay-megatron train: aborted: {e}", file=sys.stderr)
        return 3
    if summary is None:  # not rank 0
        return 0
    if summary["status"] == "completed" and cfg.train.export_hf:
        from replay_megatron.training.export import export_run_to_hf

        print(f"[train] HF export: {export_run_to_hf(cfg.run_dir)}", flush=True)
    s = summary
    print(f"[train] {s['status']}: {s['steps']}/{s['planned_steps']} steps, final loss {s['final_loss']}, "
          f"median {s['median_step_time_s']:.3f} s/step, {s['skipped_steps']} skipped; run dir {cfg.run_dir}")
    return 0
