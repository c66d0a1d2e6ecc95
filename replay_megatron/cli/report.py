"""`replay-megatron report RUN_DIR... [--base RUN_DIR] [--out DIR]`: runs side by side (SPEC.md section 5).

Writes `report.md` (one column per run; runs that differ only in run.seed share one, mean ± std; the
base's perplexity and domain accuracy first with --base), `report.json` (the same numbers, every run's own
too) and `plots/*.png` (loss, gradient norm, MoClip cos(phi) against the step; K_t histograms of the replay
stores) into DIR: by default the run dir itself for one run, `./report` for several. Needs metrics.jsonl in
each run; resolved.yaml, summary.json, eval.json and the replay store are used when present ("-"
otherwise). Exit codes: 0 done, 2 refused input.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "compare runs: report.md / report.json with stability, efficiency, forgetting and domain metrics, plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `report`."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train's output)")
    parser.add_argument("--out", help="output directory (default: the run dir for one run, ./report for several)")
    parser.add_argument("--base", metavar="RUN_DIR", help="the base model's run directory, evaluated by `eval`: a "
                                                          "first column with its perplexity and domain accuracy")


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is."""
    from replay_megatron.cli._config_args import refuse
    from replay_megatron.replay.store import ReplayStoreError
    from replay_megatron.reporting.report import REPORT_MD, write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) if len(args.run_dirs) == 1 else Path("report")
    try:
        report = write_report(args.run_dirs, out, args.base)
    except (ValueError, FileNotFoundError, ReplayStoreError) as e:
        refuse("report", e)
    print(f"report: {out / REPORT_MD} ({len(report['runs'])} runs, {len(report['plots'])} plots)")
    for note in report["notes"]:
        print(f"  note: {note}")
    return 0
