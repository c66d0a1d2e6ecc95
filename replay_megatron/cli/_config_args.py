"""What the subcommands that run a config (`collect`, `train`, `eval`) share: the arguments
`CONFIG [key=value ...]` (or `--config CONFIG ...`) and running one job on this rank with input errors
turned into `replay-megatron COMMAND: error: ...` and exit code 2 (`Refused`)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, NoReturn, TypeVar

T = TypeVar("T")


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


class Refused(Exception):
    """Refused input; `cli.main` prints `replay-megatron COMMAND: error: MESSAGE` and returns 2."""

    def __init__(self, command: str, message: Any) -> None:
        super().__init__(f"replay-megatron {command}: error: {message}")


def refuse(command: str, message: Any) -> NoReturn:
    """Refuse the command's input (exit code 2 through `cli.main`)."""
    raise Refused(command, message)


def run_config_job(args: argparse.Namespace, command: str, job: Callable[[Any, int], T]) -> tuple[Any, T]:
    """Load the config of `args` (world size from torchrun/msrun's WORLD_SIZE, else 1), run
    `job(cfg, world_size)` on this rank and return (cfg, its result). A bad config, a missing input or a
    mismatched artifact raises `Refused`; megatron's parallel state is torn down in every case."""
    from replay_megatron.config import ConfigError, load_config
    from replay_megatron.platform.distributed import shutdown
    from replay_megatron.replay.store import ReplayStoreError

    path, overrides = config_path_and_overrides(args)
    if path is None:
        refuse(command, "give the config as CONFIG or --config FILE")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(path, overrides, world_size=world_size)
        return cfg, job(cfg, world_size)
    except (ConfigError, ReplayStoreError, ValueError, FileNotFoundError) as e:
        refuse(command, e)
    finally:
        shutdown()
