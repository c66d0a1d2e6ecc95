"""`train`: Stage 1 (restricted CE on the replay store) or full-vocabulary SFT, as one resumable run.

One process per rank (torchrun / msrun, or a single process). The loop, per optimizer step: this DP
rank's micro-batches (`training.batches`: the sampler resumes at `consumed_samples`; replay candidates
joined by sample id on the last stage), megatron-core's pipeline schedule and optimizer
(`training.step.train_step`), megatron's OptimizerParamScheduler stepped after each applied update (as
Megatron-LM does); then the metrics logger, the periodic eval and the checkpointer, each at its own
cadence, and fault handling (NaN/Inf steps, SIGTERM). Everything the run writes is listed in `run_dir`.

Before any process group exists, `preflight` refuses: an optimizer the megatron stack does not carry, a
missing token store, a replay store made from another model / tokenizer / dataset or with other collect
settings (`replay.store_binding`) or not covering the data, and a run dir holding a run with another config
(`config.check_resume`). Rank 0 holds the run dir's writer lock throughout (`platform.writer_lock`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from replay_megatron import run_dir as layout_of_run
from replay_megatron.config import check_resume, model_hf_config
from replay_megatron.config.errors import ConfigError, Problem
from replay_megatron.config.resolved import config_fingerprint
from replay_megatron.data.packing import row_source
from replay_megatron.data.token_store import TokenDataset, is_token_store
from replay_megatron.models.sources import load_configured_weights
from replay_megatron.mcore_compat import muon_unavailable_reason
from replay_megatron.optim.registry import OPTIMIZERS
from replay_megatron.platform.writer_lock import held_by_rank0
from replay_megatron.replay.fingerprint import model_fingerprint
from replay_megatron.replay.store import ReplayStore
from replay_megatron.replay.store_binding import check_store_settings
from replay_megatron.runs.periodic_eval import PeriodicEval
from replay_megatron.runs.progress import Progress
from replay_megatron.runs.startup import start_run
from replay_megatron.runs.train_summary import write_summary
from replay_megatron.training.batches import TrainBatches
from replay_megatron.training.checkpointing import Checkpointer
from replay_megatron.training.faults import TerminationFlag, TrainingAborted, any_rank
from replay_megatron.training.metrics import MetricsLogger
from replay_megatron.training.objectives import objective_for
from replay_megatron.training.optimizer import build_configured_optimizer, build_scheduler
from replay_megatron.training.setup import build_ddp_model
from replay_megatron.training import step  # called through the module: fault-injection tests wrap it
from replay_megatron.training.step_metrics import k_stats, step_record


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
    spec = OPTIMIZERS[cfg.optimizer.name]
    unavailable = muon_unavailable_reason() if spec.muon else None
    if unavailable:
        raise ConfigError.of([Problem("optimizer.name", f"{spec.name!r} runs on megatron-core's Muon, which this "
                                      f"environment lacks: {unavailable}", spec.name)])
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
    rows = row_source(cfg, dataset)
    return TrainInputs(dataset, store, total_steps(cfg, len(rows)), rows)


def _token_store(cfg, key: str):
    """The token store at config key `key` (data.train / data.eval), or a ConfigError naming key and path."""

    value = getattr(cfg.data, key.split(".")[1])
    path = cfg.input_path(value)
    if not is_token_store(path):
        raise ConfigError.of([Problem(key, f"no token store at {path} (`replay-megatron preprocess` writes one)",
                                      value)])
    return TokenDataset(path)


def _open_replay_store(cfg, dataset):
    """The Stage 0 store, refused unless made from this model, tokenizer and dataset, covering every sample."""
    if cfg.train.replay_store is None:
        raise ConfigError.of([Problem("train.replay_store", "train.loss=replay needs a replay store "
                                      "(train.replay_store or collect.store_dir)", None)])
    store = ReplayStore.open(cfg.input_path(cfg.train.replay_store),
                             expect={"model": model_fingerprint(cfg), "tokenizer": dataset.tokenizer_fingerprint,
                                     "dataset": dataset.fingerprint})
    check_store_settings(store.manifest, cfg, str(store.directory))
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


@held_by_rank0(lambda cfg: cfg.run_dir, "train")
def train(cfg, *, world_size: int | None = None, progress: bool | None = None,
          stop_after_steps: int | None = None) -> dict[str, Any] | None:
    """Run (or resume) the training run of `cfg` on this rank; returns the summary on rank 0. Raises
    TrainingAborted after too many non-finite steps. `stop_after_steps`: return after that many steps
    without a final checkpoint (what a crash leaves behind; for tests)."""
    run = start_run(cfg, lambda world: preflight(cfg, world), world_size=world_size, output_dir=cfg.run_dir)
    inputs, hf, layout, t = run.checked, run.hf, run.layout, cfg.train
    model, random_init = _model(cfg, hf, layout)
    optimizer = build_configured_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, inputs.total_steps)
    checkpointer = _checkpointer(cfg, hf, layout, inputs.total_steps)
    state = checkpointer.start(model, optimizer, scheduler, random_init=random_init)
    batches = TrainBatches(cfg, inputs.rows, inputs.store, layout, hf["vocab_size"], state.consumed_samples)
    objective = objective_for(cfg)
    logger = MetricsLogger(cfg.run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                           resume_step=state.step, log_interval=t.log_interval, total_steps=inputs.total_steps,
                           active=layout.rank == 0)
    evaluator = PeriodicEval(cfg, layout, hf["vocab_size"])
    bar = Progress("train", "step", total=inputs.total_steps, initial=state.step, every=t.log_interval,
                   show=(cfg.logging.progress_bar if progress is None else progress) and layout.rank == 0)
    termination, status, steps_this_run = TerminationFlag(), "completed", 0
    model.train()
    try:
        while state.step < inputs.total_steps:
            start = time.perf_counter()
            micro_batches = batches.next_step()
            result = step.train_step(model, optimizer, micro_batches, objective)
            if not result["skipped"]:
                scheduler.step(1)
            state.count_step(result["skipped"], t.global_batch_size)
            record = _record(cfg, state, result, optimizer, micro_batches, layout, time.perf_counter() - start)
            if logger.should_log(state.step):
                logger.log(record)
            bar.update(postfix=_postfix(record), line=lambda: _progress_line(record, inputs.total_steps))
            steps_this_run += 1
            if evaluator.should_eval(state.step):
                evaluator.run(model, state.step, logger)
            if state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                checkpointer.save(state, model, optimizer, scheduler)
                raise _diverged(cfg, state)
            if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                return None
            if any_rank(termination.requested, layout.device.torch_device):
                status = "interrupted"
                break
            if checkpointer.should_save(state.step):
                checkpointer.save(state, model, optimizer, scheduler)
        if steps_this_run:  # a re-run of a finished run has nothing new to save or evaluate
            checkpointer.save(state, model, optimizer, scheduler)
            if status == "completed" and evaluator.should_eval_at_end(state.step):
                evaluator.run(model, state.step, logger)
    finally:
        termination.close()
        bar.close()
        logger.close()
    return write_summary(cfg, cfg.run_dir, state, status, inputs.total_steps) if layout.rank == 0 else None


def _record(cfg, state, result, optimizer, micro_batches, layout, elapsed: float) -> dict[str, Any]:
    """The step's metrics line; replay runs add the K_t statistics of its stored positions."""
    record = step_record(cfg, state, result, optimizer, elapsed, layout.device.torch_device)
    if cfg.train.loss == "replay":
        record.update(k_stats(micro_batches, cfg.collect.k_max, layout))
    return record


def _model(cfg, hf, layout) -> tuple[Any, bool]:
    """This rank's stage in megatron's DDP with the configured starting weights, and whether it kept its
    random initialisation (a preset without a checkpoint)."""
    model = build_ddp_model(hf, layout, params_dtype=cfg.model.params_dtype,
                            distributed_optimizer=cfg.parallel.distributed_optimizer,
                            vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    return model, load_configured_weights(cfg, model.module, hf, layout) is None


def _checkpointer(cfg, hf, layout, total_steps: int) -> Checkpointer:
    return Checkpointer(cfg.run_dir, hf, save_interval=cfg.train.save_interval, total_steps=total_steps,
                        parallel={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                                  "distributed_optimizer": cfg.parallel.distributed_optimizer},
                        config_fingerprint=config_fingerprint(cfg), rank=layout.rank)


def _diverged(cfg, state) -> TrainingAborted:
    limit = cfg.train.max_consecutive_nonfinite
    return TrainingAborted(f"{state.consecutive_nonfinite} non-finite steps in a row (train.max_consecutive_"
                           f"nonfinite={limit}); saved checkpoint {layout_of_run.checkpoint_name(state.step)} in "
                           f"{cfg.run_dir}")


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    return {"loss": f"{record['loss']:.4f}" if record["loss"] is not None else "nan"}


def _progress_line(record: dict[str, Any], total: int) -> str:
    loss = "nan (skipped)" if record["skipped"] else f"{record['loss']:.4f}"
    return (f"step {record['step']}/{total} loss {loss} lr {record['lr']:.3e} grad_norm {record['grad_norm']:.3f} "
            f"{record['step_time_s']:.2f} s/step {record['tokens_per_s']:.0f} tokens/s "
            f"(padding {record['padding_fraction']:.0%})")
