"""What Stage 0 stores for a micro-batch (SPEC.md section 1) and the records that bind a store to its inputs.

`select_records` turns one micro-batch's vocab-parallel logits into per-sample records: padded-vocabulary
columns set to -inf, each sample's loss-bearing positions (loss_mask[t] == 1, target labels[t]) narrowed by
the position strategy (`bucket` first computes the gold confidences), then one `dynamic_topk` over the
chosen rows of all samples on the TP group. `manifest_config` is the part of the run config a store's
manifest records; `check_start_record` refuses to continue a store begun with other inputs or settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from replay_megatron.models.vocab import mask_vocab_padding
from replay_megatron.platform.device import host_to_device
from replay_megatron.replay.positions import select_positions
from replay_megatron.replay.selection import TopKSelection, dynamic_topk, gold_probability
from replay_megatron.replay.store import MANIFEST_NAME, ReplayStoreError

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


