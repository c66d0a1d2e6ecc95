"""`report`: several runs side by side (SPEC.md section 5) as `report.md` (a markdown table, one column per
run), `report.json` (the same numbers, machine-readable) and PNG plots in `plots/`.

Runs that differ only in `run.seed` are repeats: they share one column showing each number's mean and
sample standard deviation, as the paper reports its 3 seeds. With a base run (the model the runs started
from, evaluated by `eval` as they are) a first column shows its held-out perplexity and domain accuracy,
so each change against the base can be read off the table.
"""
from __future__ import annotations

import os
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from replay_megatron.atomic_io import atomic_write_json, atomic_write_text
from replay_megatron.reporting.plots import pareto_plot, write_plots
from replay_megatron.reporting.runs import LM_EVAL_RETENTION, LM_EVAL_SCORE, load_run, repeat_key, run_row

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PLOTS_DIR = "plots"


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: format(v, fmt)


def _bytes(v: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if v >= size:
            return f"{v / size:.2f} {unit}"
    return f"{v:.0f} B"


def _percent(v: float) -> str:
    return f"{100 * v:+.2f}%"


# (key in a run row, row label in report.md, formatter of a present value)
ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("method", "method (loss + optimizer)", str),
    ("steps", "steps", _num(".4g")),
    ("final_loss", "final loss", _num(".4f")),
    ("loss_std", "loss std (after warm-up)", _num(".4f")),
    ("grad_norm_cv", "grad-norm CV", _num(".3f")),
    ("spike_count", "loss spikes", _num(".3g")),
    ("median_step_time_s", "median step time (s)", _num(".3f")),
    ("tokens_per_s", "tokens/s (median)", _num(".1f")),
    ("peak_memory_bytes", "peak memory", _bytes),
    ("perplexity", "general perplexity (held-out)", _num(".4f")),
    ("perplexity_change", "perplexity change (ft - base)", _num("+.4f")),
    ("perplexity_change_rel", "perplexity change (relative)", _percent),
    ("relative_l2", "relative L2 to base", _num(".3e")),
    ("domain_accuracy", "domain accuracy", _num(".3f")),
    ("stage0_time_s", "Stage 0 time (s)", _num(".1f")),
    ("stage0_s_per_micro_batch", "Stage 0 s per micro-batch", _num(".3f")),
    ("storage_bytes_per_position", "Stage 0 bytes per position", _num(".1f")),
    ("storage_fraction_of_fp16_logits", "Stage 0 storage / fp16 logits", lambda v: f"{100 * v:.3f}%"),
    ("k_median", "K_t median", _num("g")),
]


# What the base column shows: the numbers of the base's own eval, not its (pre-)training.
BASE_KEYS = ("perplexity", "domain_accuracy")
Row = tuple[str, str, Callable[[Any], str]]


def table_rows(rows: Sequence[dict[str, Any]]) -> list[Row]:
    """ROWS, then per lm-eval task and metric any run has: its score and its retention (fine-tuned / base)."""
    benchmarks = sorted({key.split(":", 1)[1] for r in rows for key in r if key.startswith(LM_EVAL_SCORE + ":")})
    extra: list[Row] = []
    for name in benchmarks:
        task, metric = name.split(":", 1)
        extra += [(f"{LM_EVAL_SCORE}:{name}", f"lm-eval {task} {metric}", _num(".4f")),
                  (f"{LM_EVAL_RETENTION}:{name}", f"lm-eval {task} {metric} retention", _num(".3f"))]
    return ROWS + extra


def _base_value(base: dict[str, Any], key: str) -> Any:
    return base.get(key) if key in BASE_KEYS or key.startswith(LM_EVAL_SCORE + ":") else None


def _cell(value: Any, fmt: Callable[[Any], str], std: Optional[float] = None) -> str:
    if value is None:
        return "-"
    text = fmt(value) if std is None else f"{fmt(value)} ± {fmt(std).lstrip('+')}"
    return text.replace("|", "\\|")


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[Row] = ROWS) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mean, std) of each row number over repeats: a value all runs share as it is (std None), None when
    a run lacks it, else the mean and the sample standard deviation."""
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key, _, _ in keys:
        values = [r.get(key) for r in rows]
        if None in values or len(set(values)) == 1:
            mean[key], std[key] = (None if None in values else values[0]), None
        else:
            mean[key], std[key] = statistics.mean(values), statistics.stdev(values)
    return mean, std


def columns(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The table's columns: runs grouped by `keys` (repeat_key), in order of first appearance."""
    shown = table_rows(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row, key in zip(rows, keys):
        groups.setdefault(key, []).append(row)
    cols = []
    for members in groups.values():
        mean, std = summarize(members, shown)
        cols.append({"name": members[0]["name"], "run_dirs": [r["run_dir"] for r in members],
                     "seeds": [r["seed"] for r in members], "mean": mean, "std": std})
    names = [c["name"] for c in cols]
    for c in cols:  # two different configs under one name: tell them apart by where they ran
        c["label"] = c["name"] if names.count(c["name"]) == 1 else c["run_dirs"][0]
    return cols


def markdown_table(cols: Sequence[dict[str, Any]], base: Optional[dict[str, Any]] = None) -> str:
    """Metrics as rows; the base (BASE_KEYS only), then one column per group of repeats ("-" where a run
    lacks the number, "mean ± std" over repeats)."""
    heads = (["base"] if base is not None else []) + [
        c["label"] + (f" (n={len(c['run_dirs'])})" if len(c["run_dirs"]) > 1 else "") for c in cols]
    lines = ["| metric | " + " | ".join(h.replace("|", "\\|") for h in heads) + " |", "|---|" + "---|" * len(heads)]
    for key, label, fmt in table_rows([{k: None for k in c["mean"]} for c in cols]):
        cells = [_cell(_base_value(base, key), fmt)] if base is not None else []
        cells += [_cell(c["mean"][key], fmt, c["std"][key]) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Unique run names for report.json and plot legends: the name, else name and seed, else the run dir."""
    names = [r["name"] for r in rows]
    seeded = [f"{r['name']} seed {r['seed']}" for r in rows]
    return [n if names.count(n) == 1 else s if seeded.count(s) == 1 else r["run_dir"]
            for n, s, r in zip(names, seeded, rows)]


def _base_notes(base: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Where the base column cannot be read as the runs' base: no eval, or other weights or eval data."""
    if base["perplexity"] is None:
        return [f"base {base['run_dir']}: no held-out perplexity (run `eval` on it)"]
    return [f"{r['run_dir']}: its eval's base perplexity {r['base_perplexity']:.4f} is not the base column's "
            f"{base['perplexity']:.4f} (other base weights or eval data)" for r in rows
            if r["base_perplexity"] is not None and not math.isclose(r["base_perplexity"], base["perplexity"],
                                                                     rel_tol=1e-6)]


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read `run_dirs` (and the base run `base_dir`), write report.md, report.json and plots/*.png into
    `out_dir`; returns report.json."""
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    out_dir = Path(out_dir)
    runs = [load_run(d) for d in run_dirs]
    base_run = load_run(base_dir) if base_dir is not None else None
    rows = [run_row(r) for r in runs]
    cols = columns(rows, [repeat_key(r) for r in runs])
    for row, label in zip(rows, _labels(rows)):
        row["name"] = label
    base = run_row(base_run) if base_run is not None else None
    plots = write_plots(runs, [r["name"] for r in rows], out_dir / PLOTS_DIR)
    plots += [p for p in [pareto_plot(cols, base, out_dir / PLOTS_DIR / "pareto.png")] if p is not None]
    notes = [f"{r.run_dir}: {note}" for r in runs + ([base_run] if base_run else []) for note in r.notes]
    notes += _base_notes(base, rows) if base is not None else []
    report = {"runs": rows, "columns": cols, "base": base, "plots": [str(p.relative_to(out_dir)) for p in plots],
              "notes": notes}
    md = ["# replay-megatron report", "", markdown_table(cols, base), "",
          "Stability after warm-up (SPEC.md section 5): loss std, grad-norm CV (std/mean), spikes = steps whose "
          "loss exceeds the trailing-window mean by more than sigma trailing std. \"-\": not available for the run. "
          "n > 1: mean ± sample standard deviation over n runs that differ only in their seed."
          + (" base: the model the runs started from, evaluated like them." if base is not None else "")
          + " lm-eval rows: lm-evaluation-harness scores from its own results files; retention = fine-tuned /"
            " base score (the paper's Table 2).",
          "", *[f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]]
    if notes:
        md += ["", "Notes:", *[f"- {n}" for n in notes]]
    atomic_write_text(out_dir / REPORT_MD, "\n".join(md) + "\n")
    atomic_write_json(out_dir / REPORT_JSON, report)
    return report
