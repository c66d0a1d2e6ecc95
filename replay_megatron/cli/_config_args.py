"""The config arguments shared by the subcommands that run a config (`collect`, `train`, `eval`):
`CONFIG [key=value ...]` or `--config CONFIG [key=value ...]`."""
from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file (positional or --config) and key=value overrides."""
    parser.add_argument("config_file", nargs="?", help="YAML config file (or use --config)")
    parser.add_argument("--config", dest="config_opt", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.train_iters=100")


def config_path_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(config file, overrides) as given; None when no config file was given."""
    overrides = list(args.overrides)
    if args.config_opt and args.config_file:  # `--config FILE a=b`: the positional slot took the first override
        overrides.insert(0, args.config_file)
    return args.config_opt or args.config_file, overrides
