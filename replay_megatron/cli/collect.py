"""`replay-megatron collect --config FILE [key=value ...]`: Stage 0, the replay store of SPEC.md section 1.

Runs the base model forward-only over `data.train` with megatron-core at the configured TP x PP (DP = world
size / (TP x PP)) and writes `collect.store_dir`. Launch it like training:

    NPROC=4 launch/cpu_gloo.sh collect configs/cpu/tiny_tp2pp1.yaml run.data_root=/tmp/tiny   # CPU, gloo
    torchrun --nproc-per-node 8 -m replay_megatron collect --config FILE ...                 # CUDA / NPU

Without torchrun (no WORLD_SIZE in the environment) it runs as a single process. Re-running the same
command after a crash resumes from the committed samples. Exit codes: 0 done, 2 refused input.
"""
from __future__ import annotations

import argparse

from replay_megatron.cli._config_args import add_config_arguments, run_config_job

HELP = "Stage 0: dynamic Top-K collection into a replay store (forward only, any TP/PP/DP)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `collect`."""
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")


def run(args: argparse.Namespace) -> int:
    """Load the config, collect, print the store summary on rank 0."""
    from replay_megatron.runs.collect import collect, format_summary

    progress = False if args.no_progress else None
    cfg, summary = run_config_job(args, "collect",
                                  lambda cfg, world: collect(cfg, world_size=world, progress=progress))
    if summary is not None:
        print(format_summary(summary, cfg.input_path(cfg.collect.store_dir)))
    return 0
