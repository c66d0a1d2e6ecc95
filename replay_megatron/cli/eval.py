"""`replay-megatron eval --config FILE [key=value ...] [--run-dir DIR]`: forgetting and domain metrics of a run.

Loads the run's final weights and the base weights at the config's TP x PP, computes held-out perplexity of
both on `data.eval` (full vocabulary), its change, the relative L2 distance to the base and, when
`eval.domain` is set and `<run_dir>/hf` exists, the domain metric; writes `<run_dir>/eval.json` and prints a
table. Launch like `train` (torchrun / launch/cpu_gloo.sh for TP*PP > 1); without WORLD_SIZE it runs as one
process. Exit codes: 0 done, 2 refused input (the message names the missing path or field).
"""
from __future__ import annotations

import argparse

from replay_megatron.cli._config_args import add_config_arguments, run_config_job

HELP = "held-out perplexity change, relative L2 to the base and the domain metric of a trained run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eval`."""
    add_config_arguments(parser)
    parser.add_argument("--run-dir", help="run directory to evaluate (default: <run.out_dir>/<run.name>)")


def run(args: argparse.Namespace) -> int:
    """Load the config, evaluate, print the table on rank 0."""
    from replay_megatron.runs.evaluate import evaluate_run, format_table

    _, result = run_config_job(args, "eval", lambda cfg, world: evaluate_run(cfg, args.run_dir))
    if result is not None:
        print(format_table(result))
    return 0
