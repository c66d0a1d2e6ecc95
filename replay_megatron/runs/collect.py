"""Stage 0 of Logits Replay (SPEC.md section 1): run the base model over the training data once, store S_t.

The megatron-core Qwen3 runs forward-only through megatron's pipeline schedule at any TP x PP x DP. On the
last pipeline stage each micro-batch's vocab-parallel logits [b, s, V/TP] go through
`replay.records.select_records` (positions, then dynamic Top-K on the TP group). TP rank 0 of the last
stage of each DP group writes shard `dp_rank` of the replay store.

Resume. The writer's committed sample ids are the progress record. The writing rank decides which of its
DP rank's micro-batches still hold an uncommitted sample and shares that list (all-gather of objects) over
its model-parallel group (every TP rank and PP stage of the DP rank), so all ranks run the same pipeline
schedule; a half-committed micro-batch is recomputed and only its new samples are written. Micro-batches
are formed the same way in every run, so a resumed store equals an uninterrupted one byte for byte.

Every rank runs `preflight` (file checks, fingerprints: each rank hashes the checkpoint once, about 1 s
per GB, from the page cache after the first) before any process group or model exists.

Fingerprints (manifest `fingerprints`): `model` = `replay.fingerprint.model_fingerprint`: `fingerprint_files` of the HF checkpoint dir (or of the
megatron checkpoint dir when `model.mcore_checkpoint` is set); for a preset with random initialisation it
is `fingerprint_json({"preset_config": hf, "seed": run.seed})` - such weights also depend on the TP/PP
layout, so a preset store is for smoke tests only. `tokenizer` and `dataset` are the token store's own
fingerprints. `<store>/collect.json` records them (with the DP size) when collection starts, and a
re-run against another model, tokenizer, dataset or DP size is refused before any work, naming which.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.config import model_hf_config
from replay_megatron.data.dataset import real_positions, sequential_micro_batches
from replay_megatron.data.packing import row_source
from replay_megatron.data.token_store import TokenDataset
from replay_megatron.data.tokenizer import load_tokenizer
from replay_megatron.models.forward import pipeline_forward, schedule_chunks
from replay_megatron.models.sources import build_loaded_stage
from replay_megatron.platform.device import host_to_device
from replay_megatron.platform.exact_sum import all_reduce_float64
from replay_megatron.platform.writer_lock import held_by_rank0
from replay_megatron.replay.fingerprint import model_fingerprint
from replay_megatron.replay.records import (START_RECORD, TIMING_RECORD, CollectSettings, check_start_record,
                                            manifest_config, select_records)
from replay_megatron.replay.store import MANIFEST_NAME, ReplayStore, ReplayStoreError
from replay_megatron.replay.store_writer import ReplayStoreWriter, finalize_store
from replay_megatron.runs.progress import Progress
from replay_megatron.runs.startup import start_run


def preflight(cfg, world_size: int) -> dict[str, Any]:
    """File checks before any device work; returns the start record {fingerprints, config, vocab_size}.

    Refuses: a missing data.train or collect.store_dir, a token store whose vocabulary exceeds the model's,
    a data.tokenizer whose fingerprint differs from the one the token store was built with, a store dir
    begun with another model/tokenizer/dataset/config (`check_start_record`).
    """
    if cfg.data.train is None or cfg.collect.store_dir is None:
        raise ValueError("collect needs data.train (a token store) and collect.store_dir")
    dataset = TokenDataset(cfg.input_path(cfg.data.train))
    hf = model_hf_config(cfg)
    if dataset.vocab_size > hf["vocab_size"]:
        raise ValueError(f"token store {dataset.path} has vocab_size {dataset.vocab_size}, more than the model's "
                         f"vocab_size {hf['vocab_size']}: the model and the tokenizer do not match")
    if cfg.data.tokenizer is not None:
        tok_fp = load_tokenizer(cfg.input_path(cfg.data.tokenizer)).fingerprint()
        if tok_fp != dataset.tokenizer_fingerprint:
            raise ReplayStoreError(f"data.tokenizer {cfg.data.tokenizer} has fingerprint {tok_fp}, but token "
                                   f"store {dataset.path} was built with tokenizer {dataset.tokenizer_fingerprint}")
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by TP*PP = {tp * pp}")
    record = {"fingerprints": {"model": model_fingerprint(cfg), "tokenizer": dataset.tokenizer_fingerprint,
                               "dataset": dataset.fingerprint},
              "config": manifest_config(CollectSettings.from_config(cfg), cfg, world_size // (tp * pp)),
              "vocab_size": int(hf["vocab_size"])}
    check_start_record(Path(cfg.input_path(cfg.collect.store_dir)), record)
    return record


def _share_todo(todo: list[int] | None, layout) -> list[int]:
    """The writer's list of micro-batches still to run (None on other ranks), given to every rank of its
    model-parallel group (all TP ranks and PP stages of this DP rank), so they run the same schedule."""
    if layout.tp * layout.pp == 1:
        return todo
    group = ps.get_model_parallel_group()
    gathered: list[list[int] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, todo, group=group)
    return next(t for t in gathered if t is not None)


@held_by_rank0(lambda cfg: cfg.collect.store_dir and cfg.input_path(cfg.collect.store_dir), "collect")
def collect(cfg, *, world_size: int | None = None, stop_after: int | None = None, commit_every: int = 256,
            progress: bool | None = None) -> dict[str, Any] | None:
    """Run Stage 0 for `cfg` on this process (one rank of a torchrun/msrun job, or a single process).

    Returns the store summary on rank 0 (None elsewhere). `stop_after`: return after that many micro-batches
    of this rank without closing the writer (what a kill leaves behind; for tests). `commit_every`: samples
    per committed part file (the most a crash can lose).
    """
    store_dir = Path(cfg.input_path(cfg.collect.store_dir)) if cfg.collect.store_dir is not None else None
    run = start_run(cfg, lambda world: preflight(cfg, world), world_size=world_size, output_dir=store_dir,
                    start_files=lambda record: {START_RECORD: record})
    record, hf, layout = run.checked, run.hf, run.layout
    settings = CollectSettings.from_config(cfg)
    dataset = TokenDataset(cfg.input_path(cfg.data.train))
    is_writer = layout.is_last_stage and layout.tp_rank == 0
    writer = ReplayStoreWriter(store_dir, layout.dp_rank, k_max=settings.k_max, logits_dtype=settings.store_logits,
                               commit_every=commit_every) if is_writer else None
    rows = row_source(cfg, dataset)  # samples, or packs of them (data.packing)
    index_batches = list(sequential_micro_batches(len(rows), settings.micro_batch_size, layout.dp, layout.dp_rank))
    todo = None
    if writer is not None:
        done = writer.committed_sample_ids
        todo = [] if writer.closed else [m for m, idx in enumerate(index_batches)
                                         if not done.issuperset(rows.sample_ids(idx))]
    todo = _share_todo(todo, layout)
    if stop_after is not None:
        todo = todo[:stop_after]

    model = build_loaded_stage(cfg, hf, layout)
    tp_group = ps.get_tensor_model_parallel_group() if layout.tp > 1 else None
    device = layout.device.torch_device
    bar = Progress("collect", "micro-batch", total=len(index_batches), initial=len(index_batches) - len(todo),
                   every=max(1, len(index_batches) // 20),
                   show=(cfg.logging.progress_bar if progress is None else progress) and layout.rank == 0)
    started = time.perf_counter()
    for ids in schedule_chunks(todo, lambda m: len(index_batches[m]), layout.pp):
        host = [rows.batch(index_batches[m]) for m in ids]
        on_output = _store_callback(host, settings, writer, vocab_size=hf["vocab_size"],
                                    tp_rank=layout.tp_rank, tp_group=tp_group)
        pipeline_forward(model, [host_to_device(b.tokens, device) for b in host], on_output,
                         [host_to_device(b.position_ids, device) if b.packed else None for b in host])
        bar.update(len(ids))
    bar.close()
    elapsed = time.perf_counter() - started
    if stop_after is not None:
        return None
    ran = [r for m in todo for r in index_batches[m]]  # real (non-pad) positions and row positions over DP
    real, slots = all_reduce_float64(torch.tensor([real_positions(dataset.lengths[rows.sample_ids(ran)],
                                                                  settings.seq_length),
                                                   len(ran) * settings.seq_length], dtype=torch.float64,
                                                  device=device), group=ps.get_data_parallel_group()).tolist()
    timing = {"wall_s": elapsed, "micro_batches": len(todo), "micro_batch_size": settings.micro_batch_size,
              "seconds_per_micro_batch": elapsed / len(todo) if todo else None, "tokens": int(real),
              "tokens_per_s": real / elapsed if todo else None, "padding_fraction": 1 - real / slots if todo else None}
    if layout.rank == 0 and todo:  # before the shards close: a kill from here on leaves nothing to recompute
        atomic_write_json(store_dir / TIMING_RECORD, timing)  # (a re-run that computes nothing keeps it)
    if writer is not None:
        writer.close()
    dist.barrier()
    if layout.rank != 0:
        return None
    if not (store_dir / MANIFEST_NAME).exists():
        finalize_store(store_dir, layout.dp, config=record["config"], fingerprints=record["fingerprints"],
                       vocab_size=record["vocab_size"])
    return {**ReplayStore.open(store_dir, expect=record["fingerprints"]).summary(), "timing": timing}


def _store_callback(batches: list, settings: CollectSettings, writer: ReplayStoreWriter | None, *,
                    vocab_size: int, tp_rank: int, tp_group):
    """`pipeline_forward`'s on_output: select the records of micro-batch i and hand new samples to the writer."""
    def on_output(logits: torch.Tensor, i: int) -> None:
        batch = batches[i]  # on the host: only the labels travel to the logits' device
        records = select_records(logits, host_to_device(batch.labels, logits.device), batch.loss_mask,
                                 batch.segments, settings,
                                 vocab_size=vocab_size, vocab_start=tp_rank * logits.shape[-1], tp_group=tp_group)
        if writer is not None:
            done = writer.committed_sample_ids  # a resumed micro-batch may hold committed samples
            for r in records:
                if r.sample_id not in done:
                    writer.add(r.sample_id, r.positions, r.targets, r.selection)

    return on_output


def format_summary(summary: Mapping[str, float | int], store_dir: str | Path) -> str:
    """The closing lines `collect` prints: store size, K_t statistics, bytes per position, Stage 0 time."""
    s = summary
    return (f"replay store {store_dir}: {s['samples']} samples, {s['positions']} positions stored\n"
            f"  K_t median {s['k_median']:.1f}  mean {s['k_mean']:.2f}  p90 {s['k_p90']:.1f}\n"
            f"  gold appended {100 * s['gold_appended_rate']:.2f}%  mean covered mass {s['covered_mass_mean']:.4f}\n"
            f"  {s['bytes_per_position']:.1f} bytes per position = {100 * s['fraction_of_fp16_logits']:.3f}% of "
            f"full fp16 logits ({s['bytes']} bytes)"
            + (f"\n  Stage 0 time {s['timing']['wall_s']:.1f} s, {s['timing']['seconds_per_micro_batch']:.3f} s per "
               f"micro-batch of {s['timing']['micro_batch_size']}, {s['timing']['tokens_per_s']:.0f} tokens/s "
               f"(padding {s['timing']['padding_fraction']:.0%} of the rows)"
               if s.get("timing", {}).get("seconds_per_micro_batch") else ""))

