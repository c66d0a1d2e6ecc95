"""`report`: several runs side by side (SPEC.md section 5) as `report.md` (a markdown table, one column per
run), `report.json` (the same numbers, machine-readable) and PNG plots in `plots/`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from replay_megatron.atomic_io import atomic_write_json, atomic_write_text
from replay_megatron.reporting.plots import write_plots
from replay_megatron.reporting.runs import load_run, run_row

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
    ("steps", "steps", str),
    ("final_loss", "final loss", _num(".4f")),
    ("loss_std", "loss std (after warm-up)", _num(".4f")),
    ("grad_norm_cv", "grad-norm CV", _num(".3f")),
    ("spike_count", "loss spikes", str),
    ("median_step_time_s", "median step time (s)", _num(".3f")),
    ("tokens_per_s", "tokens/s (median)", _num(".1f")),
    ("peak_memory_bytes", "peak memory", _bytes),
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


def _cell(value: Any, fmt: Callable[[Any], str]) -> str:
    return "-" if value is None else fmt(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Metrics as rows, runs as columns ("-" where a run lacks the number)."""
    header = "| metric | " + " | ".join(r["name"].replace("|", "\\|") for r in rows) + " |"
    lines = [header, "|---|" + "---|" * len(rows)]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(r[key], fmt) for r in rows) + " |")
    return "\n".join(lines)


def _labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Unique run names for columns and plot legends (the run dir path when names repeat)."""
    names = [r["name"] for r in rows]
    return [r["name"] if names.count(r["name"]) == 1 else r["run_dir"] for r in rows]


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `run_dirs`, write report.md, report.json and plots/*.png into `out_dir`; returns report.json."""
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    out_dir = Path(out_dir)
    runs = [load_run(d) for d in run_dirs]
    rows = [run_row(r) for r in runs]
    for row, label in zip(rows, _labels(rows)):
        row["name"] = label
    plots = write_plots(runs, [r["name"] for r in rows], out_dir / PLOTS_DIR)
    notes = [f"{r.run_dir}: {note}" for r in runs for note in r.notes]
    report = {"runs": rows, "plots": [str(p.relative_to(out_dir)) for p in plots], "notes": notes}
    md = ["# replay-megatron report", "", markdown_table(rows), "",
          "Stability after warm-up (SPEC.md section 5): loss std, grad-norm CV (std/mean), spikes = steps whose "
          "loss exceeds the trailing-window mean by more than sigma trailing std. \"-\": not available for the run.",
          "", *[f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]]
    if notes:
        md += ["", "Notes:", *[f"- {n}" for n in notes]]
    atomic_write_text(out_dir / REPORT_MD, "\n".join(md) + "\n")
    atomic_write_json(out_dir / REPORT_JSON, report)
    return report
