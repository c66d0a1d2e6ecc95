"""`replay-megatron plan CONFIG [key=value ...]`: validate a config and print its layout, parameters and memory.

Needs no devices and imports neither torch nor megatron, so it runs on a login node before a launch
(the launch/ scripts call it first). Options go before or after all overrides, not between them.
Exit codes: 0 valid (1 with --fail-if-over and an OVER verdict), 2 invalid config.
"""
from __future__ import annotations

import argparse
import sys

HELP = "check a config without devices: parallel layout, parameters, memory per device vs the device"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `plan`."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. optimizer.lr=2e-6")
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of ranks (default TP x PP, i.e. DP = 1)")
    parser.add_argument("--device-memory-gb", type=float, default=64.0,
                        help="memory per device in GiB (default 64: Ascend 910B3)")
    parser.add_argument("--stage", choices=("all", "train", "collect"), default="all",
                        help="which stage's memory to estimate and judge (default both)")
    parser.add_argument("--train-data", type=int, default=None, nargs=2, metavar=("TOKENS", "SAMPLES"),
                        help="loss-bearing tokens and samples of data.train, to size the whole replay store "
                             "(default: read from data.train's meta.json when it exists)")
    parser.add_argument("--fail-if-over", action="store_true", help="exit 1 when the estimate exceeds the device")


def run(args: argparse.Namespace) -> int:
    """Load and check the config, print the plan."""
    from replay_megatron.config import ConfigError, load_config
    from replay_megatron.config.plan import format_plan, make_plan, train_data_counts

    if args.world_size is not None and args.world_size < 1:
        print(f"--world-size must be >= 1 (got {args.world_size})", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    plan = make_plan(cfg, args.world_size, args.device_memory_gb)
    print(f"config: {args.config}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    train_data = tuple(args.train_data) if args.train_data else train_data_counts(cfg)
    print(format_plan(plan, args.stage, train_data))
    return 1 if args.fail_if_over and not plan.fits(args.stage) else 0
