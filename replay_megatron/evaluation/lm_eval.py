"""Benchmark retention with lm-evaluation-harness (the paper's Table 2): the same tasks on the base's and
the fine-tuned model's HF exports, retention = fine-tuned / base per task and metric.

lm-eval (the `[eval]` extra) runs in this process through its Python API on the complete HF export
(`transformers` loads model and tokenizer from the directory alone). Its own results file is written under
`<out_dir>/<label>/` by its EvaluationTracker, exactly as its CLI writes it, and every number returned
here is read back from that file, so eval.json and the report carry lm-eval's numbers unchanged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

LM_EVAL_DIR = "lm_eval"  # in the run dir: lm-eval's results files, the base's HF export


def require_lm_eval():
    """lm_eval, or an ImportError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError("eval.lm_eval needs lm-evaluation-harness: pip install 'replay-megatron[eval]'") from None
    return lm_eval


def task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's TaskManager; indexing its hundreds of built-in tasks takes seconds, so it is skipped
    when `include_path` holds every task asked for."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
        return TaskManager(include_path=str(include_path))
    return TaskManager()


def harness_scores(hf_dir: str | os.PathLike, settings, out_dir: str | os.PathLike, device: str,
                   tasks, tokenizer: str | os.PathLike) -> dict[str, Any]:
    """Run lm-eval's tasks `settings.tasks` (from the TaskManager `tasks`) on the HF model in `hf_dir` with
    the HF tokenizer in `tokenizer`; {"file": its results file, "scores": {task: {metric: value}}} as read
    back from that file."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    from replay_megatron.platform.cpu_adapter import factories_restored

    tracker = EvaluationTracker(output_path=str(out_dir))
    limit = int(settings.limit) if settings.limit is not None and settings.limit >= 1 else settings.limit
    dtype = "float32" if torch.device(device).type == "cpu" else "auto"
    with factories_restored():  # eval runs with megatron's CPU adapter active
        results = simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "tokenizer": str(tokenizer),
                                                          "dtype": dtype},
                                  tasks=list(settings.tasks), num_fewshot=settings.num_fewshot, limit=limit,
                                  batch_size=settings.batch_size, device=device, task_manager=tasks,
                                  apply_chat_template=settings.apply_chat_template, evaluation_tracker=tracker)
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    files = sorted(Path(out_dir).rglob(f"results_{tracker.date_id}.json"))
    if len(files) != 1:
        raise FileNotFoundError(f"{out_dir}: lm-eval's results file results_{tracker.date_id}.json not found")
    return {"file": str(files[0]), "scores": read_scores(files[0])}


def read_scores(results_file: str | os.PathLike) -> dict[str, dict[str, float]]:
    """{task: {"metric,filter": value}} of an lm-eval results file (its `results` section, stderr left out)."""
    results = json.loads(Path(results_file).read_text())["results"]
    return {task: {metric: value for metric, value in values.items()
                   if "," in metric and "_stderr" not in metric and isinstance(value, (int, float))}
            for task, values in results.items()}


def retention(base: Mapping[str, Mapping[str, float]], finetuned: Mapping[str, Mapping[str, float]]
              ) -> dict[str, dict[str, dict[str, float | None]]]:
    """{task: {metric: {"base", "finetuned", "retention"}}}: retention = fine-tuned / base (None if base is 0)."""
    return {task: {metric: {"base": base[task][metric], "finetuned": value,
                            "retention": value / base[task][metric] if base[task][metric] else None}
                   for metric, value in metrics.items() if metric in base.get(task, {})}
            for task, metrics in finetuned.items()}


def lm_eval_retention(base_hf: Path, finetuned_hf: Path, settings, out_dir: Path, device: str,
                      include_path: Path | None = None) -> dict[str, Any]:
    """eval.json's `lm_eval` entry: both models' lm-eval scores, retention per task, lm-eval's files. Both
    use the fine-tuned export's tokenizer (the run's; a base HF dir need not hold one)."""
    require_lm_eval()
    tasks = task_manager(list(settings.tasks), include_path)
    base = harness_scores(base_hf, settings, out_dir / "base", device, tasks, finetuned_hf)
    finetuned = harness_scores(finetuned_hf, settings, out_dir / "finetuned", device, tasks, finetuned_hf)
    return {"settings": settings.model_dump(mode="json"), "base_model": str(base_hf),
            "finetuned_model": str(finetuned_hf), "results_files": {"base": base["file"], "finetuned": finetuned["file"]},
            "tasks": retention(base["scores"], finetuned["scores"])}


def configured_lm_eval(cfg, run_dir: Path, base_weights: Path, finetuned_hf: Path | None, device) -> dict[str, Any]:
    """`eval.lm_eval` for a run: the base's HF dir (exported into `<run_dir>/lm_eval/base_hf` when the base is
    a megatron checkpoint) against the run's HF export; {"skipped": why} when the run has no export."""
    from replay_megatron.models.checkpoint import META_FILE
    from replay_megatron.training.export import export_hf, run_tokenizer

    if finetuned_hf is None:
        return {"skipped": f"{run_dir / 'hf'} does not exist (train.export_hf)"}
    out_dir = run_dir / LM_EVAL_DIR
    base_hf = base_weights
    if (base_weights / META_FILE).is_file():
        base_hf = export_hf(base_weights, out_dir / "base_hf", run_tokenizer(cfg), progress=False)
    return lm_eval_retention(base_hf, finetuned_hf, cfg.eval.lm_eval, out_dir, str(device),
                             cfg.input_path(cfg.eval.lm_eval.include_path))


def table_lines(entry: Mapping[str, Any] | None) -> list[str]:
    """`eval`'s printed lines for eval.json's lm-eval entry (none when it did not run)."""
    if not entry:
        return []
    if "skipped" in entry:
        return [f"  lm-eval skipped: {entry['skipped']}"]
    return [f"  {f'{task} {metric}':<22}{v['base']:>12.4f}{v['finetuned']:>12.4f}"
            f"{'' if v['retention'] is None else format(v['retention'], '.3f') + ' retained':>21}"
            for task, metrics in entry["tasks"].items() for metric, v in metrics.items()]
