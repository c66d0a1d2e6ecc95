"""`replay-megatron demo [--out DIR] [--quick] [--seeds N] [--methods M ...]`: the paper's comparison at toy
scale on CPU, one command.

Generates its data (general tasks, NL2SQL over SQLite) and tokenizer, pre-trains a tiny Qwen3 base on 2
CPU ranks (TP2, gloo) and evaluates it, then runs AdamW SFT against Dynamic Top-K + MoClip (and the two
mixed variants, or the methods picked, ablations of MoClip's parts included) on the same NL2SQL data and
steps, `--seeds` times each, evaluates each run (NL2SQL execution accuracy, general perplexity and its
change, relative L2 to the base) and writes a report (mean ± std over the seeds, the base's column first);
every step is a `replay-megatron` subcommand with a config from configs/demo/. A second invocation reuses
every finished step (see replay_megatron/demo/runner.py). Exit codes: 0 done, 1 a step failed (its log is
named), 2 bad configs or arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "CPU demo: generated data, tiny Qwen3 base, AdamW SFT vs Dynamic Top-K + MoClip over seeds, eval, report"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `demo`."""
    from replay_megatron.demo.pipeline import CONFIG_DIR, MAIN_METHODS, METHODS, QUICK_METHODS

    parser.add_argument("--out", help="output directory (default: ./demo_out, ./demo_out_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke version: small data, few steps, two methods")
    parser.add_argument("--seed", type=int, help="run.seed of every training run, the base's included (default: "
                                                 "the configs')")
    parser.add_argument("--seeds", type=_positive, default=1,
                        help="train each method with this many seeds (its seed + 0, 1, ...: the data order); the "
                             "base and the Stage 0 store are shared; the report shows mean ± std (default 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                        help=f"the runs to compare, configs/demo/METHOD.yaml, from {', '.join(METHODS)} "
                             f"(default: {' '.join(MAIN_METHODS)}; with --quick {' '.join(QUICK_METHODS)})")
    parser.add_argument("--configs", type=Path, default=CONFIG_DIR, help=f"demo config dir (default {CONFIG_DIR})")


def run(args: argparse.Namespace) -> int:
    """Run every step (reusing finished ones), then print the report table and its path."""
    from replay_megatron.cli._config_args import refuse
    from replay_megatron.demo.pipeline import demo_steps, report_dir
    from replay_megatron.demo.runner import DemoError, Runner

    out = Path(args.out or ("demo_out_quick" if args.quick else "demo_out")).resolve()
    try:
        steps = demo_steps(out, quick=args.quick, seed=args.seed, seeds=args.seeds, methods=args.methods,
                           config_dir=args.configs)
        out.mkdir(parents=True, exist_ok=True)
        runner = Runner(out)
    except (ValueError, DemoError) as e:  # a bad config (ConfigError is a ValueError) or an unreadable ledger
        refuse("demo", e)
    start = time.monotonic()
    print(f"demo{' (quick)' if args.quick else ''}: {len(steps)} steps into {out}", flush=True)
    try:
        for i, step in enumerate(steps, 1):
            runner.run(step, i, len(steps))
    except DemoError as e:
        print(f"replay-megatron demo: {e}", file=sys.stderr)
        return 1
    report = report_dir(out) / "report.md"
    print(f"\n{report.read_text()}\nreport: {report}\ndemo finished in {time.monotonic() - start:.1f} s", flush=True)
    return 0
