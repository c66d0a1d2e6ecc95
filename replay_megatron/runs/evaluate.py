"""`eval` of one run (SPEC.md section 5, forgetting and domain): the fine-tuned weights against the base.

At the config's TP x PP (DP = the rest of the world) it builds two copies of the model, the run's final
weights (`run_dir.checkpoint_model_dir`) and the base weights, computes the held-out perplexity of both on
`data.eval` (when set), the perplexity change and the relative L2 distance; then, on rank 0 only and with
no other rank waiting on it, the domain metric through the HF export when `eval.domain` is set and
`<run_dir>/hf` exists. Rank 0 writes `<run_dir>/eval.json` atomically.

The base (theta_base) is `eval.base_checkpoint` (an HF dir or a `save_megatron` dir) when set, else the
run's starting weights: `model.mcore_checkpoint` / `model.hf_path`, or `checkpoints/iter_0000000/model`
that `train` saves for a preset's random initialisation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist

from replay_megatron import run_dir as layout_of_run
from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.data.token_store import TokenDataset
from replay_megatron.evaluation.distance import relative_l2_distance
from replay_megatron.evaluation.perplexity import configured_perplexity
from replay_megatron.models.checkpoint import META_FILE
from replay_megatron.models.sources import build_loaded_stage
from replay_megatron.runs.startup import start_run


def base_weights(cfg, run_dir: Path) -> Path:
    """The directory of theta_base (see the module doc); names the missing path when there is none."""
    if cfg.eval.base_checkpoint is not None:
        path, field = cfg.input_path(cfg.eval.base_checkpoint), "eval.base_checkpoint"
    elif cfg.model.mcore_checkpoint is not None:
        path, field = cfg.input_path(cfg.model.mcore_checkpoint), "model.mcore_checkpoint"
    elif cfg.model.hf_path is not None:
        path, field = cfg.input_path(cfg.model.hf_path), "model.hf_path"
    else:
        path = run_dir / layout_of_run.CHECKPOINTS / layout_of_run.checkpoint_name(0) / "model"
        field = f"the starting weights of preset {cfg.model.preset!r} (saved by train)"
    if not ((path / META_FILE).is_file() or (path / "config.json").is_file()):
        raise FileNotFoundError(f"{path} ({field}): neither a megatron checkpoint ({META_FILE}) nor an HF "
                                f"directory (config.json)")
    return path


def preflight(cfg, run_dir: Path) -> dict[str, Any]:
    """Every input path checked before any process group exists: {final, base, eval_data, hf_export}."""
    final = layout_of_run.checkpoint_model_dir(run_dir)
    if not (final / META_FILE).is_file():
        raise FileNotFoundError(f"{final / META_FILE}: the run's final weights are missing")
    eval_data = None
    if cfg.data.eval is not None:
        eval_data = cfg.input_path(cfg.data.eval)
        TokenDataset(eval_data)  # names the path when it is not a token store
    hf_export = run_dir / layout_of_run.HF_EXPORT
    if cfg.eval.domain is not None:
        from replay_megatron.evaluation.domain import databases_of, read_examples

        if cfg.data.tokenizer is None:
            raise ValueError("eval.domain needs data.tokenizer (prompts are encoded as in training)")
        if not cfg.input_path(cfg.data.tokenizer).exists():
            raise FileNotFoundError(f"data.tokenizer: {cfg.input_path(cfg.data.tokenizer)} does not exist")
        domain_data = cfg.input_path(cfg.eval.domain.data)
        read_examples(domain_data, cfg.eval.domain.limit)  # its JSONL and databases, before any work
        databases_of(domain_data)
    return {"final": final, "base": base_weights(cfg, run_dir), "eval_data": eval_data,
            "hf_export": hf_export if (hf_export / "config.json").is_file() else None}


def _domain(cfg, hf_export: Path, device) -> dict[str, Any]:
    from replay_megatron.evaluation.domain import domain_accuracy

    d = cfg.eval.domain
    result = domain_accuracy(hf_export, cfg.input_path(cfg.data.tokenizer), cfg.input_path(d.data),
                             max_new_tokens=d.max_new_tokens, limit=d.limit, device=device)
    return {"task": d.task, "data": str(cfg.input_path(d.data)), "accuracy": result["domain_accuracy"],
            "examples": result["examples"], "correct": result["correct"],
            "first_predictions": result["predictions"][:5]}


def evaluate_run(cfg, run_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Evaluate the run in `run_dir` (default: the config's) on this rank; returns eval.json's contents on
    rank 0 (None elsewhere). Call `platform.distributed.shutdown()` afterwards."""
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
    run = start_run(cfg, lambda world: preflight(cfg, run_dir))
    paths, hf, layout = run.checked, run.hf, run.layout
    base = build_loaded_stage(cfg, hf, layout, paths["base"])
    final = build_loaded_stage(cfg, hf, layout, paths["final"])
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "checkpoint": str(paths["final"].parent), "base_weights": str(paths["base"]),
        "parallel": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
        "relative_l2": relative_l2_distance(final, base),
        "eval_data": None if paths["eval_data"] is None else str(paths["eval_data"]),
        "base": None, "finetuned": None, "perplexity_change": None, "perplexity_change_rel": None,
        "domain": None,
    }
    if paths["eval_data"] is not None:
        dataset = TokenDataset(paths["eval_data"])
        before = configured_perplexity(base, dataset, cfg, layout, hf["vocab_size"])
        after = configured_perplexity(final, dataset, cfg, layout, hf["vocab_size"])
        result.update(base=before, finetuned=after,
                      perplexity_change=after["perplexity"] - before["perplexity"],
                      perplexity_change_rel=(after["perplexity"] - before["perplexity"]) / before["perplexity"])
    del base, final
    dist.barrier()
    if layout.rank != 0:  # the domain metric runs on rank 0 alone; no collective waits for it
        return None
    if cfg.eval.domain is not None:
        result["domain"] = (_domain(cfg, paths["hf_export"], layout.device.torch_device)
                            if paths["hf_export"] is not None else
                            {"skipped": f"{run_dir / layout_of_run.HF_EXPORT} does not exist (train.export_hf)"})
    atomic_write_json(run_dir / layout_of_run.EVAL, result)
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """The short table `eval` prints."""
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    base, ft = result["base"] or {}, result["finetuned"] or {}
    domain = result["domain"] or {}
    lines = [f"eval of {result['run_dir']} (base: {result['base_weights']})",
             f"  {'':<22}{'base':>12}{'fine-tuned':>12}{'change':>12}",
             f"  {'held-out loss':<22}{num(base.get('eval_loss'), '.4f'):>12}{num(ft.get('eval_loss'), '.4f'):>12}"
             f"{num(ft['eval_loss'] - base['eval_loss'] if ft else None, '+.4f'):>12}",
             f"  {'perplexity':<22}{num(base.get('perplexity'), '.3f'):>12}{num(ft.get('perplexity'), '.3f'):>12}"
             f"{num(result['perplexity_change'], '+.3f'):>12}",
             f"  {'relative L2 to base':<22}{'':>12}{num(result['relative_l2'], '.3e'):>12}"]
    if "accuracy" in domain:
        lines.append(f"  {'domain accuracy':<22}{'':>12}{domain['accuracy']:>12.3f}   "
                     f"({domain['correct']}/{domain['examples']} {domain['task']})")
    elif "skipped" in domain:
        lines.append(f"  domain metric skipped: {domain['skipped']}")
    return "\n".join(lines)
