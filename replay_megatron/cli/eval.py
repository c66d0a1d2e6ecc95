"""`replay-megatron eval --config FILE [key=value ...] [--run-dir DIR]`: forgetting and domain metrics of a run.

Loads the run's final weights and the base weights at the config's TP x PP, computes held-out perplexity of
both on `data.eval` (full vocabulary), its change, the relative L2 distance to the base and, when
`eval.domain` is set and `<run_dir>/hf` exists, the domain metric; writes `<run_dir>/eval.json` and prints a
table. Launch like `train` (torchrun / launch/cpu_gloo.sh for TP*PP > 1); without WORLD_SIZE it runs as one
process. Exit codes: 0 done, 2 refused input (the message names the missing path or field).
"""
from __future__ import annotations

import argparse
import os
import sys

from replay_megatron.cli._config_args import add_config_arguments, config_path_and_overrides

HELP = "held-out perplexity change, relative L2 to the base and the domain metric of a trained run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eval`."""
    add_config_arguments(parser)
    parser.add_argument("--run-dir", help="run directory to evaluate (default: <run.out_dir>/<run.name>)")


def run(args: argparse.Namespace) -> int:
    """Load the config, evaluate, print the table on rank 0."""
    from replay_megatron.config import ConfigError, load_config
    from replay_megatron.evaluation.run import evaluate_run, format_table
    from replay_megatron.platform.distributed import shutdown

    path, overrides = config_path_and_overrides(args)
    if path is None:
        print("replay-megatron eval: error: give the config as --config FILE", file=sys.stderr)
        return 2
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(path, overrides, world_size=world_size)
        result = evaluate_run(cfg, args.run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"replay-megatron eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if result is not None:
        print(format_table(result))
    return 0
