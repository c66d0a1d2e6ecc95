"""`replay-megatron` console entry point: every other module in `replay_megatron.cli` is a subcommand.

A subcommand module `cli/foo_bar.py` becomes `replay-megatron foo-bar`; it defines `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`, and keeps heavy imports (torch, megatron) inside `run`,
so `replay-megatron plan` needs no device stack.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import replay_megatron.cli as _cli_package


def subcommands() -> dict[str, str]:
    """Subcommand name -> module name, discovered from the modules of `replay_megatron.cli`."""
    names = sorted(m.name for m in pkgutil.iter_modules(_cli_package.__path__) if not m.name.startswith("_"))
    return {n.replace("_", "-"): n for n in names if n != "main"}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="replay-megatron", description="Logits Replay + MoClip post-training of Qwen3 on megatron-core (NPU, CUDA, CPU).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in subcommands().items():
        module = importlib.import_module(f"replay_megatron.cli.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns its exit code."""
    from replay_megatron.platform.launch_env import is_msrun_scheduler

    if is_msrun_scheduler():  # msrun's scheduler process has no work in a PyTorch job
        return 0
    from replay_megatron.cli._config_args import Refused
    from replay_megatron.platform.dependency_warnings import silence_dependency_warnings

    silence_dependency_warnings()
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Refused as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
