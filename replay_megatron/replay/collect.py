"""Stage 0 of Logits Replay (SPEC.md section 1): run the base model over the training data once, store S_t.

The megatron-core Qwen3 runs forward-only through megatron's pipeline schedule at any TP x PP x DP. On the
last pipeline stage each micro-batch's vocab-parallel logits [b, s, V/TP] go through `select_records`:
padded-vocabulary columns set to -inf, each sample's loss-bearing positions (loss_mask[t] == 1, target
labels[t]) narrowed by the position strategy (`bucket` first computes the gold confidences), then one
`dynamic_topk` over the chosen rows of all samples on the TP group. TP rank 0 of the last stage of each DP
group writes shard `dp_rank` of the replay store.

Resume. The writer's committed sample ids are the progress record. The writing rank decides which of its
DP rank's micro-batches still hold an uncommitted sample and shares that list (all-gather of objects) over
its model-parallel group (every TP rank and PP stage of the DP rank), so all ranks run the same pipeline
schedule; a half-committed micro-batch is recomputed and only its new samples are written. Micro-batches
are formed the same way in every run, so a resumed store equals an uninterrupted one byte for byte.

Every rank runs `preflight` (file checks, fingerprints: each rank hashes the checkpoint once, about 1 s
per GB, from the page cache after the first) before any process group or model exists.

Fingerprints (manifest `fingerprints`): `model` = `fingerprint_files` of the HF checkpoint dir (or of the
megatron checkpoint dir when `model.mcore_checkpoint` is set); for a preset with random initialisation it
is `fingerprint_json({"preset_config": hf, "seed": run.seed})` - such weights also depend on the TP/PP
layout, so a preset store is for smoke tests only. `tokenizer` and `dataset` are the token store's own
fingerprints. `<store>/collect.json` records them (with the DP size) when collection starts, and a
re-run against another model, tokenizer, dataset or DP size is refused before any work, naming which.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.platform.device import host_to_device
from replay_megatron.replay.fingerprint import fingerprint_files, fingerprint_json
from replay_megatron.replay.positions import select_positions
from replay_megatron.replay.selection import TopKSelection, dynamic_topk, gold_probability
from replay_megatron.replay.store import MANIFEST_NAME, ReplayStore, ReplayStoreError, ReplayStoreWriter

START_RECORD = "collect.json"
TIMING_RECORD = "collect_timing.json"  # Stage 0 wall time of the invocation that finished the store


@dataclass(frozen=True)
class CollectSettings:
    """What decides the stored records (SPEC.md section 1): selection, positions, batching."""

    tau: float
    k_max: int
    strategy: str
    amount: int | float
    buckets: int
    seed: int
    store_logits: str | None  # None | fp16 | bf16 | fp32
    micro_batch_size: int
    seq_length: int

    @classmethod
    def from_config(cls, cfg) -> CollectSettings:
        c = cfg.collect
        return cls(tau=c.tau, k_max=c.k_max, strategy=c.positions.strategy, amount=c.positions.amount,
                   buckets=c.positions.buckets, seed=cfg.run.seed,
                   store_logits=None if c.store_logits == "none" else c.store_logits,
                   micro_batch_size=c.micro_batch_size, seq_length=cfg.data.seq_length)


class SampleRecords(NamedTuple):
    """The stored positions of one sample, ready for `ReplayStoreWriter.add`."""

    sample_id: int
    positions: torch.Tensor  # [n] int64, ascending
    targets: torch.Tensor  # [n] int64
    selection: TopKSelection


def mask_vocab_padding(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Set the columns of padded vocabulary rows (global id >= V) of a [..., V_local] shard to -inf, in place."""
    pad_from = max(0, vocab_size - vocab_start)
    if pad_from < logits.shape[-1]:
        logits[..., pad_from:] = float("-inf")
    return logits


def _flatten(rows: list[int], starts: list[int], per_sample: list[torch.Tensor],
             device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index pairs of per-sample position lists, for gathering [N, V_local] logit rows."""
    empty = [torch.empty(0, dtype=torch.int64)]
    row_of = torch.cat([torch.full((len(p),), r, dtype=torch.int64) for r, p in zip(rows, per_sample)] or empty)
    columns = torch.cat([p + c for c, p in zip(starts, per_sample)] or empty)
    return host_to_device(row_of, device), host_to_device(columns, device)


def select_records(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, segments: torch.Tensor,
                   settings: CollectSettings, *, vocab_size: int, vocab_start: int = 0,
                   tp_group=None) -> list[SampleRecords]:
    """SPEC.md section 1 for one micro-batch: positions per sample, then dynamic Top-K on all chosen rows.

    `logits` [b, s, V_local] (this TP rank's shard in the model's dtype, modified in place: vocab padding ->
    -inf; selection works in fp32 on the gathered rows only), `labels` (on the logits' device) and
    `loss_mask` [b, s] in `dataset.make_batch`'s layout, `segments` [n, 4] (sample id, row, first column,
    length; a sample id of -1 marks filler; these two best on the host, where positions are chosen).
    Positions are those inside each sample, so packed and unpacked batches give the same records. A
    collective on `tp_group`: every TP rank must call it with the same batch.
    """
    mask_vocab_padding(logits, vocab_start, vocab_size)
    host_mask = loss_mask.cpu() > 0  # positions are chosen on the host (a no-op for the host copy collect passes)
    samples = [(sid, row, start, host_mask[row, start:start + n].nonzero().squeeze(-1))
               for sid, row, start, n in segments.tolist() if sid >= 0]
    rows, starts = [row for _, row, _, _ in samples], [start for _, _, start, _ in samples]
    confidences = [None] * len(samples)
    if settings.strategy == "bucket":
        row_of, columns = _flatten(rows, starts, [pos for *_, pos in samples], logits.device)
        c = gold_probability(logits[row_of, columns], labels[row_of, columns], vocab_start=vocab_start,
                             tp_group=tp_group).cpu().numpy()
        confidences = np.split(c, np.cumsum([len(pos) for *_, pos in samples])[:-1])
    chosen = [torch.from_numpy(select_positions(settings.strategy, pos.numpy(), sample_id=sid, seed=settings.seed,
                                                amount=settings.amount, confidences=conf,
                                                buckets=settings.buckets))
              for (sid, *_, pos), conf in zip(samples, confidences)]
    row_of, columns = _flatten(rows, starts, chosen, logits.device)
    targets = labels[row_of, columns]
    selection = dynamic_topk(logits[row_of, columns], targets, settings.tau, settings.k_max,
                             vocab_start=vocab_start, tp_group=tp_group,
                             return_logits=settings.store_logits is not None)
    out, first = [], 0
    for (sid, *_), pos in zip(samples, chosen):
        part = slice(first, first + len(pos))
        first += len(pos)
        out.append(SampleRecords(sid, pos, targets[part], TopKSelection(
            *(None if t is None else t[part] for t in selection))))
    return out


# --- Fingerprints and the start record ---------------------------------------------------------------------

def model_fingerprint(cfg) -> str:
    """The manifest's `model` fingerprint of the configured base model (see the module doc)."""
    from replay_megatron.config import model_hf_config

    if cfg.model.mcore_checkpoint is not None:
        return fingerprint_files([cfg.input_path(cfg.model.mcore_checkpoint)])
    if cfg.model.hf_path is not None:
        return fingerprint_files([cfg.input_path(cfg.model.hf_path)])
    return fingerprint_json({"preset_config": model_hf_config(cfg), "seed": cfg.run.seed})


def manifest_config(settings: CollectSettings, cfg, dp: int) -> dict[str, Any]:
    """The `config` a store's manifest records: every setting that shapes the records, no paths (a store
    collected elsewhere, or resumed from another directory, gets the same manifest)."""
    return {"collect": {"tau": settings.tau, "k_max": settings.k_max, "store_logits": settings.store_logits,
                        "micro_batch_size": settings.micro_batch_size,
                        "positions": {"strategy": settings.strategy, "amount": settings.amount,
                                      "buckets": settings.buckets}},
            "seed": settings.seed, "seq_length": settings.seq_length,
            "model": {"params_dtype": cfg.model.params_dtype,
                      "make_vocab_size_divisible_by": cfg.model.make_vocab_size_divisible_by},
            "parallel": {"tp": cfg.parallel.tensor_model_parallel_size,
                         "pp": cfg.parallel.pipeline_model_parallel_size, "dp": dp}}


def check_start_record(store_dir: Path, record: Mapping[str, Any]) -> None:
    """Refuse to continue a store begun (or finished) with another model/tokenizer/dataset/config/DP size."""
    path = store_dir / START_RECORD
    if not path.is_file():
        if (store_dir / MANIFEST_NAME).exists() or any(store_dir.glob("shard-*")) or any(store_dir.glob("parts-*")):
            raise ReplayStoreError(f"{store_dir} holds replay store files but no {START_RECORD}: not a store "
                                   f"this command started; choose an empty collect.store_dir")
        return
    found = json.loads(path.read_text())
    for key in ("model", "tokenizer", "dataset"):
        if found["fingerprints"].get(key) != record["fingerprints"][key]:
            raise ReplayStoreError(
                f"{store_dir} was collected with another {key}: fingerprint '{key}' differs ({path}: "
                f"{found['fingerprints'].get(key)}, now: {record['fingerprints'][key]}); use a new "
                f"collect.store_dir or the original {key}")
    if found.get("config") != record["config"]:
        raise ReplayStoreError(f"{store_dir} was started with collect config {found.get('config')}, this run has "
                               f"{record['config']}; resume with the same settings and world size, or use a new "
                               f"collect.store_dir")


def preflight(cfg, world_size: int) -> dict[str, Any]:
    """File checks before any device work; returns the start record {fingerprints, config, vocab_size}.

    Refuses: a missing data.train or collect.store_dir, a token store whose vocabulary exceeds the model's,
    a data.tokenizer whose fingerprint differs from the one the token store was built with, a store dir
    begun with another model/tokenizer/dataset/config (`check_start_record`).
    """
    from replay_megatron.config import model_hf_config
    from replay_megatron.data.token_store import TokenDataset

    if cfg.data.train is None or cfg.collect.store_dir is None:
        raise ValueError("collect needs data.train (a token store) and collect.store_dir")
    dataset = TokenDataset(cfg.input_path(cfg.data.train))
    hf = model_hf_config(cfg)
    if dataset.vocab_size > hf["vocab_size"]:
        raise ValueError(f"token store {dataset.path} has vocab_size {dataset.vocab_size}, more than the model's "
                         f"vocab_size {hf['vocab_size']}: the model and the tokenizer do not match")
    if cfg.data.tokenizer is not None:
        from replay_megatron.data.tokenizer import load_tokenizer

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


# --- The model --------------------------------------------------------------------------------------------

def build_base_model(cfg, hf: Mapping[str, Any], layout) -> torch.nn.Module:
    """This rank's stage of the base model in eval mode, weights from the configured source."""
    from replay_megatron.models.qwen3 import build_stage
    from replay_megatron.models.sources import load_configured_weights

    model = build_stage(hf, layout, params_dtype=cfg.model.params_dtype,
                        vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    load_configured_weights(cfg, model, hf, layout)
    return model.eval()


# --- The loop ---------------------------------------------------------------------------------------------

def _share_todo(todo: list[int] | None, layout) -> list[int]:
    """The writer's list of micro-batches still to run (None on other ranks), given to every rank of its
    model-parallel group (all TP ranks and PP stages of this DP rank), so they run the same schedule."""
    from megatron.core import parallel_state as ps

    if layout.tp * layout.pp == 1:
        return todo
    group = ps.get_model_parallel_group()
    gathered: list[list[int] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, todo, group=group)
    return next(t for t in gathered if t is not None)


def collect(cfg, *, world_size: int | None = None, stop_after: int | None = None, commit_every: int = 256,
            progress: bool | None = None) -> dict[str, Any] | None:
    """Run Stage 0 for `cfg` on this process (one rank of a torchrun/msrun job, or a single process).

    Returns the store summary on rank 0 (None elsewhere). `stop_after`: return after that many micro-batches
    of this rank without closing the writer (what a kill leaves behind; for tests). `commit_every`: samples
    per committed part file (the most a crash can lose).
    """
    from replay_megatron.config import model_hf_config, save_resolved
    from replay_megatron.data.dataset import real_positions, sequential_micro_batches
    from replay_megatron.data.packing import row_source
    from replay_megatron.data.token_store import TokenDataset
    from replay_megatron.models.forward import pipeline_forward
    from replay_megatron.platform.distributed import initialize
    from replay_megatron.platform.exact_sum import all_reduce_float64

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    record = preflight(cfg, world)
    settings = CollectSettings.from_config(cfg)
    hf = model_hf_config(cfg)
    store_dir = Path(cfg.input_path(cfg.collect.store_dir))
    layout = initialize(device=cfg.platform.device, tp=cfg.parallel.tensor_model_parallel_size,
                        pp=cfg.parallel.pipeline_model_parallel_size, seed=cfg.run.seed,
                        num_layers=hf["num_hidden_layers"], mindspeed_adaptor=cfg.platform.mindspeed_adaptor)
    if layout.rank == 0:
        store_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store_dir / START_RECORD, record)
        save_resolved(cfg, store_dir)
    dist.barrier()

    from megatron.core import parallel_state as ps

    dataset = TokenDataset(cfg.input_path(cfg.data.train))
    pad_id = int(dataset.meta["tokenizer"].get("pad_id") or 0)
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

    model = build_base_model(cfg, hf, layout)
    tp_group = ps.get_tensor_model_parallel_group() if layout.tp > 1 else None
    device = layout.device.torch_device
    show = (cfg.logging.progress_bar if progress is None else progress) and layout.rank == 0
    bar = _progress(len(index_batches), len(index_batches) - len(todo), show)
    started = time.perf_counter()
    chunk = 4 * layout.pp  # micro-batches in flight per pipeline_forward call
    sized = [list(g) for _, g in groupby(todo, key=lambda m: len(index_batches[m]))]
    for group in sized:
        for start in range(0, len(group), chunk):
            ids = group[start:start + chunk]
            host = [rows.batch(index_batches[m], pad_id) for m in ids]
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
    if writer is not None:
        writer.close()
    dist.barrier()
    if layout.rank != 0:
        return None
    if not (store_dir / MANIFEST_NAME).exists():
        from replay_megatron.replay.store import finalize_store

        finalize_store(store_dir, layout.dp, config=record["config"], fingerprints=record["fingerprints"],
                       vocab_size=record["vocab_size"])
    timing = {"wall_s": elapsed, "micro_batches": len(todo), "micro_batch_size": settings.micro_batch_size,
              "seconds_per_micro_batch": elapsed / len(todo) if todo else None, "tokens": int(real),
              "tokens_per_s": real / elapsed if todo else None, "padding_fraction": 1 - real / slots if todo else None}
    if todo:  # a re-run of a finished store computes nothing and keeps the first timing
        atomic_write_json(store_dir / TIMING_RECORD, timing)
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


def _progress(total: int, initial: int, show: bool):
    """tqdm over micro-batches on rank 0; a no-op object elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="collect", unit="micro-batch", disable=not show)


def format_summary(summary: Mapping[str, float | int], store_dir: str | Path) -> str:
    """The closing lines of `collect` (issue 3, item 4)."""
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

