"""`train`: Stage 1 (restricted CE on the replay store) or full-vocabulary SFT, as one resumable run.

One process per rank (torchrun / msrun, or a single process). The loop, per optimizer step: this DP
rank's micro-batches from the token store (data.dataset's sampler: resumes at `consumed_samples`), the
replay candidates joined by sample id on the last stage, megatron-core's pipeline schedule and optimizer
(`training.step.train_step`), megatron's OptimizerParamScheduler stepped after each applied update (as
Megatron-LM does), then metrics, held-out perplexity, checkpoints and fault handling. Everything the run
writes is listed in `training.run_dir`.

Before any process group exists, `preflight` refuses: an optimizer the megatron stack does not carry, a
missing token store, a replay store made from another model / tokenizer / dataset or not covering the
data, and a run dir holding a run with another config (`config.check_resume`).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.config.errors import ConfigError, Problem
from replay_megatron.training import run_dir as layout_of_run
from replay_megatron.training.checkpointing import (TrainState, load_checkpoint, save_checkpoint,
                                                    save_initial_weights)
from replay_megatron.training.faults import TerminationFlag, TrainingAborted, any_rank
from replay_megatron.training.metrics import MetricsLogger

# config optimizer.name -> (optim.megatron.build_optimizer name, whether optimizer.eps is Adam's division)
MEGATRON_OPTIMIZERS = {"moclip": ("moclip", False), "adamw": ("adamw", True), "adam_atan2": ("adam-atan2", False),
                       "moclip_adam_eps": ("moclip", True)}


@dataclass
class TrainInputs:
    """What preflight found: the token data, the replay store (replay runs) and the planned length."""

    dataset: Any
    store: Any
    total_steps: int
    rows: Any  # data.packing.RowSource: what a batch row holds


def total_steps(cfg, num_samples: int) -> int:
    """Optimizer steps of the run: train.train_iters, or epochs x whole global batches per epoch."""
    if cfg.train.train_iters is not None:
        return cfg.train.train_iters
    per_epoch = num_samples // cfg.train.global_batch_size
    if per_epoch == 0:
        raise ConfigError.of([Problem("train.global_batch_size", f"data.train has {num_samples} rows (samples, or "
                                      "packs of them with data.packing), fewer than one global batch; lower it "
                                      "or set train.train_iters",
                                      cfg.train.global_batch_size)])
    return cfg.train.epochs * per_epoch


def preflight(cfg, world_size: int) -> TrainInputs:
    """Every check that needs files but no devices (see the module doc)."""
    from replay_megatron.config import check_resume, model_hf_config

    if cfg.optimizer.name not in MEGATRON_OPTIMIZERS:
        raise ConfigError.of([Problem("optimizer.name", f"{cfg.optimizer.name!r} is a plain torch optimizer here "
                                      "(replay_megatron.optim), not wired into megatron's optimizer stack; "
                                      f"train supports {', '.join(MEGATRON_OPTIMIZERS)}", cfg.optimizer.name)])
    if cfg.data.train is None:
        raise ConfigError.of([Problem("data.train", "train needs a token store (`preprocess` output)", None)])
    dataset = _token_store(cfg, "data.train")
    hf = model_hf_config(cfg)
    if dataset.vocab_size > hf["vocab_size"]:
        raise ConfigError.of([Problem("data.train", f"token store {dataset.path} has vocab_size "
                                      f"{dataset.vocab_size}, more than the model's {hf['vocab_size']}",
                                      cfg.data.train)])
    if cfg.data.eval is not None:
        _token_store(cfg, "data.eval")  # fails now rather than at the first evaluation
    store = _open_replay_store(cfg, dataset) if cfg.train.loss == "replay" else None
    check_resume(cfg, cfg.run_dir)
    from replay_megatron.data.packing import row_source

    rows = row_source(cfg, dataset)
    return TrainInputs(dataset, store, total_steps(cfg, len(rows)), rows)


def _token_store(cfg, key: str):
    """The token store at config key `key` (data.train / data.eval), or a ConfigError naming key and path."""
    from replay_megatron.data.token_store import TokenDataset, is_token_store

    value = getattr(cfg.data, key.split(".")[1])
    path = cfg.input_path(value)
    if not is_token_store(path):
        raise ConfigError.of([Problem(key, f"no token store at {path} (`replay-megatron preprocess` writes one)",
                                      value)])
    return TokenDataset(path)


def _open_replay_store(cfg, dataset):
    """The Stage 0 store, refused unless made from this model, tokenizer and dataset, covering every sample."""
    import numpy as np

    from replay_megatron.replay.collect import model_fingerprint
    from replay_megatron.replay.store import ReplayStore

    if cfg.train.replay_store is None:
        raise ConfigError.of([Problem("train.replay_store", "train.loss=replay needs a replay store "
                                      "(train.replay_store or collect.store_dir)", None)])
    store = ReplayStore.open(cfg.input_path(cfg.train.replay_store),
                             expect={"model": model_fingerprint(cfg), "tokenizer": dataset.tokenizer_fingerprint,
                                     "dataset": dataset.fingerprint})
    if cfg.train.kl_weight > 0 and store.logits_dtype is None:
        raise ConfigError.of([Problem("train.kl_weight", f"the KL term needs teacher logits, but {store.directory} "
                                      "stores none (collect with collect.store_logits=fp16|bf16|fp32)",
                                      cfg.train.kl_weight)])
    missing = np.setdiff1d(np.arange(len(dataset)), store.sample_ids())
    if missing.size:
        raise ConfigError.of([Problem("train.replay_store", f"{store.directory} has no records for {missing.size} "
                                      f"of {len(dataset)} samples (first: {missing[:5].tolist()}); was "
                                      "collection finished?", cfg.train.replay_store)])
    return store


def _scheduler(cfg, optimizer, steps: int):
    """megatron-core's OptimizerParamScheduler in optimizer steps (warm-up, decay to min_lr, constant wd)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(steps, o.warmup_iters + 1),
        lr_decay_style=o.lr_schedule, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1), wd_incr_style="constant")


def _optimizer(cfg, model):
    from replay_megatron.optim.megatron import build_optimizer

    o = cfg.optimizer
    name, uses_eps = MEGATRON_OPTIMIZERS[o.name]
    return build_optimizer(name, [model], lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                           clip_grad=o.clip_grad, params_dtype=cfg.model.params_dtype,
                           distributed_optimizer=cfg.parallel.distributed_optimizer, max_angle=o.max_angle,
                           atan2_a=o.atan2_a, atan2_b=o.atan2_b, mode=o.clip_mode,
                           eps=o.eps if uses_eps else None, min_lr=o.min_lr)


def _moclip(optimizer):
    from replay_megatron.optim.megatron import moclip_optimizers

    found = moclip_optimizers(optimizer)
    return found[0] if found else None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA/NPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "npu":
        return int(torch.npu.max_memory_allocated(device))  # type: ignore[attr-defined]
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class _Progress:
    """tqdm on rank 0 when stderr is a terminal, else a line every `every` steps; silent elsewhere."""

    def __init__(self, total: int, initial: int, every: int, show: bool) -> None:
        from tqdm import tqdm

        self.every, self.show = every, show
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step") if show and sys.stderr.isatty() \
            else None
        self.total = total

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
                                 refresh=False)
            self.bar.update(1)
        elif self.show and (record["step"] % self.every == 0 or record["step"] == self.total):
            loss = "nan (skipped)" if record["skipped"] else f"{record['loss']:.4f}"
            print(f"[train] step {record['step']}/{self.total} loss {loss} lr {record['lr']:.3e} "
                  f"grad_norm {record['grad_norm']:.3f} {record['step_time_s']:.2f} s/step "
                  f"{record['tokens_per_s']:.0f} tokens/s (padding {record['padding_fraction']:.0%})", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _k_stats(micro_batches: list, k_max: int, layout) -> dict[str, float]:
    """|S_t| statistics over the step's stored positions (all DP ranks), from a histogram all-reduce."""
    hist = torch.zeros(k_max + 2, dtype=torch.int64, device=layout.device.torch_device)
    if layout.is_last_stage:
        for mb in micro_batches:
            counts = (mb.targets.candidates >= 0).sum(dim=1)
            hist += torch.bincount(counts, minlength=k_max + 2)[:k_max + 2]
    dist.all_reduce(hist)  # over all ranks: each DP group's last stage contributes once per TP rank
    hist = (hist // layout.tp).cpu().double()
    n = hist.sum().item()
    if n == 0:
        return {}
    k = torch.arange(k_max + 2, dtype=torch.float64)
    cdf = hist.cumsum(0)
    return {"k_mean": float((hist * k).sum() / n), "k_median": float(k[int((cdf >= n / 2).nonzero()[0])]),
            "k_max": float(k[hist > 0].max())}


def train(cfg, *, world_size: int | None = None, progress: bool | None = None,
          stop_after_steps: int | None = None) -> dict[str, Any] | None:
    """Run (or resume) the training run of `cfg` on this rank; returns the summary on rank 0.

    `stop_after_steps`: return after that many steps of this invocation without a final checkpoint
    (what a crash leaves behind; for tests). Raises TrainingAborted after too many non-finite steps.
    """
    from replay_megatron.config import model_hf_config, save_resolved
    from replay_megatron.config.resolved import config_fingerprint
    from replay_megatron.data.dataset import num_microbatches, train_micro_batches
    from replay_megatron.models.sources import load_configured_weights
    from replay_megatron.platform.distributed import initialize
    from replay_megatron.training.objectives import FullVocabCE, ReplayMicroBatch, RestrictedCE
    from replay_megatron.training.replay_head import replay_targets
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    inputs = preflight(cfg, world)
    hf = model_hf_config(cfg)
    run_dir = cfg.run_dir
    layout = initialize(device=cfg.platform.device, tp=cfg.parallel.tensor_model_parallel_size,
                        pp=cfg.parallel.pipeline_model_parallel_size, seed=cfg.run.seed,
                        num_layers=hf["num_hidden_layers"], mindspeed_adaptor=cfg.platform.mindspeed_adaptor)
    device = layout.device.torch_device
    t = cfg.train
    n_micro = num_microbatches(t.global_batch_size, t.micro_batch_size, layout.dp)
    if layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
    dist.barrier()

    model = build_ddp_model(hf, layout, params_dtype=cfg.model.params_dtype,
                            distributed_optimizer=cfg.parallel.distributed_optimizer,
                            vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    source = load_configured_weights(cfg, model.module, hf, layout)
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer, inputs.total_steps)
    parallel = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                "distributed_optimizer": cfg.parallel.distributed_optimizer}
    state = TrainState(parallel=parallel, config_fingerprint=config_fingerprint(cfg))
    latest = layout_of_run.latest_checkpoint(run_dir)
    if latest is not None:
        state, optimizer_loaded = load_checkpoint(latest, model, optimizer, hf, parallel)
        scheduler.load_state_dict(state.scheduler)  # (MoClip's clip counts come with the optimizer state)
        if layout.rank == 0:
            fresh = "" if optimizer_loaded else (f"; saved at layout {state.parallel}, now {parallel}: weights and "
                                                 "data position loaded, optimizer state starts fresh")
            print(f"[train] resuming {run_dir} from {latest.name} (step {state.step}, {state.consumed_samples} "
                  f"samples){fresh}", flush=True)
        state.parallel = parallel
    elif source is None:
        save_initial_weights(run_dir, model, hf)

    objective = RestrictedCE(kl_weight=t.kl_weight) if t.loss == "replay" else FullVocabCE()
    dataset = inputs.dataset
    pad_id = int(dataset.meta["tokenizer"].get("pad_id") or 0)
    samples = train_micro_batches(len(inputs.rows), t.micro_batch_size, layout.dp, layout.dp_rank, cfg.run.seed,
                                  consumed_samples=state.consumed_samples)
    eval_data = _EvalData(cfg, layout, hf["vocab_size"]) if cfg.data.eval is not None else None
    logger = MetricsLogger(run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                           resume_step=state.step) if layout.rank == 0 else None
    show = (cfg.logging.progress_bar if progress is None else progress) and layout.rank == 0
    bar = _Progress(inputs.total_steps, state.step, t.log_interval, show)
    termination = TerminationFlag()
    status, steps_this_run = "completed", 0
    model.train()
    try:
        while state.step < inputs.total_steps:
            start = time.perf_counter()
            host = [inputs.rows.batch(next(samples), pad_id) for _ in range(n_micro)]
            batches = [b.to(device) for b in host]
            if t.loss == "replay":
                batches = [ReplayMicroBatch(b, replay_targets(h.segments, h.labels, inputs.store.get,
                                                              vocab_size=hf["vocab_size"],
                                                              with_teacher=t.kl_weight > 0).to(device)
                                            if layout.is_last_stage else None) for b, h in zip(batches, host)]
            result = train_step(model, optimizer, batches, objective)
            if not result["skipped"]:
                scheduler.step(1)
            elapsed = time.perf_counter() - start
            state.step += 1
            state.consumed_samples += t.global_batch_size
            state.skipped_steps += int(result["skipped"])
            state.consecutive_nonfinite = state.consecutive_nonfinite + 1 if result["skipped"] else 0
            record = _step_record(cfg, state, result, optimizer, elapsed, device)
            if t.loss == "replay":
                record.update(_k_stats(batches, cfg.collect.k_max, layout))
            if logger is not None and (state.step % t.log_interval == 0 or state.step == inputs.total_steps):
                logger.log(record)
            bar.update(record)
            steps_this_run += 1
            if eval_data is not None and t.eval_interval and state.step % t.eval_interval == 0:
                eval_data.run(model, state.step, logger)
            if state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                _save(run_dir, state, model, optimizer, scheduler, hf)
                raise TrainingAborted(f"{state.consecutive_nonfinite} non-finite steps in a row (train."
                                      f"max_consecutive_nonfinite={t.max_consecutive_nonfinite}); saved "
                                      f"checkpoint {layout_of_run.checkpoint_name(state.step)} in {run_dir}")
            if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                return None
            if any_rank(termination.requested, device):
                status = "interrupted"
                break
            if t.save_interval and state.step % t.save_interval == 0 and state.step < inputs.total_steps:
                _save(run_dir, state, model, optimizer, scheduler, hf)
        if steps_this_run:  # a re-run of a finished run has nothing new to save or evaluate
            _save(run_dir, state, model, optimizer, scheduler, hf)
            if status == "completed" and eval_data is not None and not (t.eval_interval and
                                                                       state.step % t.eval_interval == 0):
                eval_data.run(model, state.step, logger)
    finally:
        termination.close()
        bar.close()
        if logger is not None:
            logger.close()
    return _write_summary(cfg, run_dir, state, status, inputs.total_steps) if layout.rank == 0 else None


def _save(run_dir: Path, state: TrainState, model, optimizer, scheduler, hf) -> None:
    state.scheduler = scheduler.state_dict()
    save_checkpoint(run_dir, state, model, optimizer, hf)


def _step_record(cfg, state: TrainState, result: dict, optimizer, elapsed: float, device) -> dict[str, Any]:
    """One metrics.jsonl line (training.run_dir.METRIC_KEYS, plus MoClip's statistics)."""
    slots = cfg.train.global_batch_size * cfg.data.seq_length
    record = {"step": state.step, "loss": result["loss"], "lr": float(optimizer.param_groups[0]["lr"]),
              "grad_norm": result["grad_norm"], "skipped": result["skipped"], "tokens": result["tokens"],
              "tokens_per_s": result["real_tokens"] / elapsed, "padding_fraction": 1 - result["real_tokens"] / slots,
              "step_time_s": elapsed,
              "peak_memory_bytes": peak_memory_bytes(device), "consumed_samples": state.consumed_samples}
    moclip = _moclip(optimizer)
    if moclip is not None and moclip.last_stats is not None and not result["skipped"]:
        s = moclip.last_stats.as_floats()
        record.update(cos_phi=s["cos_phi"], clipped=bool(s["clipped"]), clip_rate=s["clip_rate"],
                      grad_norm_clipped=s["clipped_grad_norm"])
    return record


class _EvalData:
    """Held-out perplexity during training (every train.eval_interval steps and at the end)."""

    def __init__(self, cfg, layout, vocab_size: int) -> None:
        from replay_megatron.data.token_store import TokenDataset

        self.cfg, self.layout, self.vocab_size = cfg, layout, vocab_size
        self.dataset = TokenDataset(cfg.input_path(cfg.data.eval))

    def run(self, model, step: int, logger: MetricsLogger | None) -> None:
        from replay_megatron.evaluation.perplexity import configured_perplexity

        model.eval()
        with torch.no_grad():
            result = configured_perplexity(model.module, self.dataset, self.cfg, self.layout, self.vocab_size)
        model.train()
        if logger is not None:
            logger.log({"step": step, **result}, eval_record=True)


def _write_summary(cfg, run_dir: Path, state: TrainState, status: str, planned: int) -> dict[str, Any]:
    """summary.json: the run's length, efficiency and stability metrics (SPEC.md section 5)."""
    from replay_megatron.reporting.stability import configured_stability

    records = list(layout_of_run.read_jsonl(run_dir / layout_of_run.METRICS)) if cfg.logging.jsonl else []
    ok = [r for r in records if not r["skipped"]]
    summary = {
        "status": status, "steps": state.step, "planned_steps": planned, "skipped_steps": state.skipped_steps,
        "consumed_samples": state.consumed_samples, "loss": cfg.train.loss, "optimizer": cfg.optimizer.name,
        "final_loss": ok[-1]["loss"] if ok else None,
        "median_step_time_s": statistics.median(r["step_time_s"] for r in records) if records else None,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records) if records else None,
        "padding_fraction": statistics.fmean(r["padding_fraction"] for r in records) if records else None,
        "peak_memory_bytes": max((r["peak_memory_bytes"] for r in records), default=None),
        "stability": configured_stability([r["loss"] for r in ok], [r["grad_norm"] for r in ok], cfg),
    }
    if ok and "clip_rate" in ok[-1]:
        summary["moclip_clip_rate"] = ok[-1]["clip_rate"]
    if ok and "k_mean" in ok[-1]:
        summary["k_mean"] = statistics.fmean(r["k_mean"] for r in ok)
    atomic_write_json(run_dir / layout_of_run.SUMMARY, summary)
    return summary
